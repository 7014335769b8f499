// The on-disk format of the spilling aggregator: append-only files of checksummed blocks of
// (key, partial aggregate) records.
//
//   file   := header block*
//   header := "SSSP" | u16 version (1) | u8 key type (0 int64, 1 bytes) | u8 zero
//             | u32 masked CRC32C of the 8 bytes before it
//   block  := u32 payload length | u32 record count
//             | u32 masked CRC32C of the two fields above and the payload | payload
//   record := u8 tag | key | body
//     key  := i64 (int64 keys) or u32 length + bytes (byte-string keys)
//     tag 1 (singleton): body = f64, a partial that saw exactly one value; Moments::add
//           rebuilds it bit for bit, and it is 17 bytes instead of 65 for int64 keys (most
//           spilled partials of a high-cardinality group-by are singletons)
//     tag 2 (partial):   body = Moments::encode (56 bytes)
//
// All integers are little-endian. A file is a sequence of runs (one per spill of a
// partition) but runs need no framing: every record is a self-contained partial, and
// merging is order-independent. Every block is verified before any of its records is used,
// so a damaged file raises CorruptDataError naming the file and never feeds a wrong
// partial into the result. Files are opened per run and closed again, so an aggregator
// holds no file descriptors between calls.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "core/byte_io.h"
#include "core/stats.h"

namespace streamstate {

enum class SpillKeyType : std::uint8_t { kInt64 = 0, kBytes = 1 };

inline constexpr char kSpillMagic[4] = {'S', 'S', 'S', 'P'};
inline constexpr std::uint16_t kSpillFormatVersion = 1;
inline constexpr std::size_t kSpillFileHeaderSize = 12;
inline constexpr std::size_t kSpillBlockHeaderSize = 12;
inline constexpr std::uint8_t kSpillTagSingleton = 1;
inline constexpr std::uint8_t kSpillTagPartial = 2;

// True when `m` is exactly what Moments{}.add(m.sum) produces, so it can be stored as one
// value. NaN-safe: compares bit patterns through the fields' relationships, not equality.
[[nodiscard]] bool spill_is_singleton(const Moments& m) noexcept;

// Encodes one record (tag, key, body) onto `out`.
void spill_encode_record(std::string& out, std::int64_t key, const Moments& m);
void spill_encode_record(std::string& out, std::string_view key, const Moments& m);

// Appends one run of records to a spill file. `existing_size` is what earlier runs wrote
// (0: none, and the file is created with its header; it must not exist yet). The file is
// opened without following a symlink, created exclusively, and appended to only when it
// is still the regular file of `existing_size` bytes this aggregator wrote: spill
// directories are private, and a name planted there anyway is refused, never written
// through. Records are buffered into `buffer` (the caller's, so its capacity is counted
// once and reused) and written a block at a time. finish() must be called for the run to
// count; if the writer is destroyed without it (an exception unwinding), the file is cut
// back to its length before the run (removed, if this run created it), so a failed spill
// never leaves half a run behind.
class SpillRunWriter {
 public:
  SpillRunWriter(std::string path, SpillKeyType key_type, std::string& buffer,
                 std::size_t block_bytes, std::uint64_t existing_size);
  ~SpillRunWriter();
  SpillRunWriter(const SpillRunWriter&) = delete;
  SpillRunWriter& operator=(const SpillRunWriter&) = delete;
  SpillRunWriter(SpillRunWriter&&) = delete;
  SpillRunWriter& operator=(SpillRunWriter&&) = delete;

  template <typename Key>
  void add(const Key& key, const Moments& m) {
    spill_encode_record(buffer_, key, m);
    ++block_records_;
    if (buffer_.size() >= block_bytes_ + kSpillBlockHeaderSize) flush_block();
  }

  // Writes the last block and closes the file; returns the bytes this run added.
  std::uint64_t finish();

 private:
  void flush_block();
  void write_all(std::string_view data);
  // Cuts the file back to start_size_, or removes it when this run created it; closes it.
  void discard_run() noexcept;
  void start_block();

  std::string path_;
  std::string& buffer_;
  std::size_t block_bytes_;
  int fd_ = -1;
  std::uint64_t start_size_ = 0;  // file length before this run (0: this run created it)
  std::uint64_t written_ = 0;
  std::uint32_t block_records_ = 0;
  bool finished_ = false;
};

// Reads a spill file block by block into the caller's `buffer`. next() yields records whose
// key views point into the buffer and stay valid until the following next() call. Like the
// writer, it opens only the regular file itself, never a symlink in its place.
// `expected_size` is what the writers reported: a file cut at a block boundary would
// otherwise read as a valid shorter file and silently lose groups.
class SpillFileReader {
 public:
  SpillFileReader(std::string path, SpillKeyType key_type, std::string& buffer,
                  std::uint64_t expected_size);
  ~SpillFileReader();
  SpillFileReader(const SpillFileReader&) = delete;
  SpillFileReader& operator=(const SpillFileReader&) = delete;
  SpillFileReader(SpillFileReader&&) = delete;
  SpillFileReader& operator=(SpillFileReader&&) = delete;

  // False at a clean end of file; throws CorruptDataError naming the file otherwise.
  bool next(std::int64_t& key, Moments& m);
  bool next(std::string_view& key, Moments& m);

  [[nodiscard]] const std::string& path() const noexcept { return path_; }

 private:
  // Loads and verifies the next block; false at the end of the file.
  bool load_block();
  bool advance();  // true when a record is available in the current block
  void read_exact(char* dst, std::size_t n);
  std::uint8_t read_tag();
  void read_body(std::uint8_t tag, Moments& m);
  [[noreturn]] void corrupt(const std::string& what) const;

  std::string path_;
  SpillKeyType key_type_;
  std::string& buffer_;
  int fd_ = -1;
  std::uint64_t file_size_ = 0;
  std::uint64_t offset_ = 0;        // of the next unread byte in the file
  std::uint64_t block_offset_ = 0;  // of the current block, for messages
  ByteReader block_{std::string_view{}, "spill block"};
  std::uint32_t block_left_ = 0;    // records not yet returned from the current block
};

}  // namespace streamstate
