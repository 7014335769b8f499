// The one container every state snapshot in the project is written in.
//
//   [magic "SSRC"][u16 LE format version][u16 LE kind][u32 LE entry count]
//   entry_count x ([u32 LE key length][key][u32 LE value length][value])
//   [u32 LE masked CRC32C of every byte before it]
//
// The kind names the component that wrote the snapshot, so restoring an aggregate store
// from a state-backend checkpoint fails loudly instead of producing nonsense.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/byte_io.h"

namespace streamstate {

enum class RecordKind : std::uint16_t {
  kUser = 0,                   // free for callers of encode_records
  kAggregateStore = 1,         // opaque partials keyed by (group, partition)
  kNumericAggregateStore = 2,  // typed numeric partials
  kStateBackend = 3,           // keyed state backend checkpoint
  kSpillRun = 4,               // spilling aggregator
  kNumericAggregateStoreDelta = 5,  // a NumericAggregateStore's changes since its last capture
  kAggregateStoreDelta = 6,         // an AggregateStore's changes since its last capture
  kStateBackendDelta = 7,           // a state backend's changes since its last checkpoint
  kWindowStore = 8,                 // a WindowedAggregateStore's windows
  kWindowStoreDelta = 9,            // a WindowedAggregateStore's changes since its last capture
  kDelta = 0xDE17,             // an incremental checkpoint: ordered changes to a parent state
};

inline constexpr char kRecordMagic[4] = {'S', 'S', 'R', 'C'};
inline constexpr std::uint16_t kRecordFormatVersion = 1;
inline constexpr std::size_t kRecordHeaderSize = 12;
inline constexpr std::size_t kRecordTrailerSize = 4;
inline constexpr std::size_t kRecordEntryOverhead = 8;

class RecordWriter {
 public:
  explicit RecordWriter(std::uint16_t kind, std::size_t payload_size_hint = 0);
  explicit RecordWriter(RecordKind kind, std::size_t payload_size_hint = 0)
      : RecordWriter(static_cast<std::uint16_t>(kind), payload_size_hint) {}

  // Throws InvalidArgument for a key or value over 4 GiB or more than 2^32-1 entries.
  void add(std::string_view key, std::string_view value);
  // A record whose value fill(std::string& out) appends straight into the container, so a
  // large capture is encoded once instead of into a chunk and then copied. `size_hint`
  // (the value's expected size) lets a large container adopt the recycled buffer before
  // it grows. Throws as add() does; if fill throws, the record is dropped whole.
  template <class Fill>
  void add_with(std::string_view key, std::size_t size_hint, Fill&& fill) {
    const std::size_t start = open_record(key, size_hint);
    try {
      std::forward<Fill>(fill)(out_);
    } catch (...) {
      out_.resize(start);
      throw;
    }
    close_record(start);
  }
  // Hands fill(char* container) the container written so far, to write values into room
  // that add_with() made for them (sized ahead, filled out of order). Lengths, keys and
  // anything outside that room must stay as they are.
  template <class Fill>
  void overwrite(Fill&& fill) {
    std::forward<Fill>(fill)(out_.data());
  }
  [[nodiscard]] std::size_t count() const noexcept { return count_; }
  // Seals the container (patches the count, appends the CRC) and hands the bytes over.
  [[nodiscard]] std::string finish() &&;

 private:
  void reserve_for(std::size_t more);
  // Writes a record's key and a placeholder value length; returns where the record began.
  std::size_t open_record(std::string_view key, std::size_t size_hint);
  // Patches the length of the value appended since open_record() returned `start`.
  void close_record(std::size_t start);

  std::string out_;
  std::size_t count_ = 0;
};

// Gives a finished container's buffer back once its bytes have been copied out, for the next
// large container to be written into. A store capture of tens of MB every few seconds then
// neither grows its buffer by doubling (copying it each time) nor faults in fresh pages,
// which on a virtual machine cost more than writing the bytes (a 47 MB delta capture: 3
// fresh copies' worth of page faults). One buffer of at most kRecycledBufferMax bytes is
// kept, process-wide; a RecordWriter adopts it once its container passes
// kRecycledBufferMin bytes, so small containers never carry a large buffer away.
inline constexpr std::size_t kRecycledBufferMin = std::size_t{1} << 20;
inline constexpr std::size_t kRecycledBufferMax = std::size_t{256} << 20;
void recycle_record_buffer(std::string&& buffer) noexcept;

// Builds a container straight into caller memory (e.g. a Python bytes object of a size
// worked out beforehand), so a large snapshot is written once with no intermediate copy.
// Each record is either added whole with add_encoded(), or opened with begin() and its
// value then written with raw()/u32()/u64(); the caller writes exactly the value size it
// announced. The capacity check guards the caller's buffer: a caller whose size
// computation was wrong gets std::logic_error, never an overrun.
class RecordBufferWriter {
 public:
  RecordBufferWriter(char* out, std::size_t capacity, RecordKind kind);

  // A record whose bytes, lengths included, are already laid out as the container stores
  // them ([u32 key length][key][u32 value length][value]).
  void add_encoded(std::string_view record) {
    count_up();
    raw(record);
  }
  // Opens a record: writes the key and the value length; the value bytes follow.
  // Throws InvalidArgument for a key or value over 4 GiB.
  void begin(std::string_view key, std::size_t value_size);
  void raw(std::string_view bytes) {
    ensure(bytes.size());
    copy_bytes(out_ + pos_, bytes.data(), bytes.size());
    pos_ += bytes.size();
  }
  void u32(std::uint32_t v) {
    ensure(4);
    store_u32(out_ + pos_, v);
    pos_ += 4;
  }
  void u64(std::uint64_t v) {
    u32(static_cast<std::uint32_t>(v));
    u32(static_cast<std::uint32_t>(v >> 32));
  }

  [[nodiscard]] std::size_t count() const noexcept { return count_; }
  // Seals the container (patches the count, appends the CRC); returns its size in bytes.
  std::size_t finish();

 private:
  void ensure(std::size_t n) const {
    if (n > capacity_ - pos_) overflow();
  }
  void count_up() {
    if (count_ == std::numeric_limits<std::uint32_t>::max()) too_many();
    ++count_;
  }
  [[noreturn]] static void overflow();
  [[noreturn]] static void too_many();

  char* out_;
  std::size_t capacity_;
  std::size_t pos_ = 0;
  std::uint32_t count_ = 0;
};

struct RecordView {
  std::string_view key;
  std::string_view value;
};

// The fixed-size header every reader checks first, and the checks on it, so both readers
// reject a bad container with the same words.
struct RecordHeader {
  std::uint16_t kind = 0;
  std::size_t count = 0;
  std::string_view body;  // the records, between header and trailer

  // Checks the length (at least a header and a trailer), the magic and the version, and
  // reads the fields; throws CorruptDataError saying what is wrong.
  [[nodiscard]] static RecordHeader parse(std::string_view data);
  // Throws CorruptDataError unless the container was written by `expected`.
  void expect_kind(RecordKind expected) const;
  // Each entry takes at least 8 bytes, so an impossible count fails before any work;
  // throws CorruptDataError.
  void check_count() const;
};

// Validates the whole container on construction (magic, version, CRC, every length, no
// trailing bytes) and throws CorruptDataError saying what is wrong; once constructed,
// iteration cannot fail. Views point into the caller's buffer, which must outlive the reader.
class RecordReader {
 public:
  explicit RecordReader(std::string_view data);

  [[nodiscard]] std::uint16_t kind() const noexcept { return header_.kind; }
  [[nodiscard]] std::size_t count() const noexcept { return header_.count; }
  // Throws CorruptDataError unless the container was written by `expected`.
  void expect_kind(RecordKind expected) const { header_.expect_kind(expected); }

  // Fills `out` with the next record; false after the last one.
  bool next(RecordView& out) noexcept;

 private:
  RecordHeader header_;
  std::size_t pos_ = 0;  // into header_.body
};

// Reads a container in one pass, for restores of large snapshots. The checks are
// RecordReader's (magic, version, kind, every length, no trailing bytes, CRC32C), but the
// checksum runs a block ahead of the record walk instead of over the whole buffer first,
// so each byte comes from memory once rather than three times. Records are handed out
// before the checksum is confirmed: a caller may only build private state from them, and
// must call finish() (which throws CorruptDataError on a mismatch) before publishing
// anything. Views point into the caller's buffer, which must outlive the reader.
class SinglePassRecordReader {
 public:
  // Checks the header (including that `expected` wrote it); throws CorruptDataError.
  SinglePassRecordReader(std::string_view data, RecordKind expected);

  [[nodiscard]] std::size_t count() const noexcept { return count_; }

  // The next record; false after the last. Throws CorruptDataError on a length that runs
  // past the end.
  bool next(RecordView& out) {
    if (index_ == count_) return false;
    ++index_;
    const std::size_t key_len = load_u32(take(4));
    out.key = std::string_view(take(key_len), key_len);
    const std::size_t value_len = load_u32(take(4));
    out.value = std::string_view(take(value_len), value_len);
    return true;
  }

  // Confirms that every record was read, that nothing follows the last one and that the
  // checksum matches; throws CorruptDataError.
  void finish();

 private:
  static constexpr std::size_t kBlock = std::size_t{64} << 10;

  const char* take(std::size_t n) {
    if (n > end_ - pos_) truncated(n);
    // Keep the checksum a block ahead, so the walk reads bytes the CRC just brought in.
    if (pos_ + n + kBlock / 2 > crc_done_) checksum_through(std::min(end_, pos_ + n + kBlock));
    const char* out = data_.data() + pos_;
    pos_ += n;
    return out;
  }
  [[noreturn]] void truncated(std::size_t needed) const;
  void checksum_through(std::size_t end) noexcept;

  std::string_view data_;
  std::size_t count_ = 0;
  std::size_t index_ = 0;
  std::size_t pos_ = 0;
  std::size_t end_ = 0;  // where the trailer starts
  std::size_t crc_done_ = 0;
  std::uint32_t crc_ = 0;
};

// The identity of a sealed container: its stored CRC32C (the last four bytes). A store
// delta names its parent by this, so equal states written alike share an identity and a
// delta applied to anything but its parent is refused. `data` must be a validated container.
[[nodiscard]] inline std::uint32_t record_identity(std::string_view data) noexcept {
  return load_u32(data.data() + data.size() - kRecordTrailerSize);
}

[[nodiscard]] std::string encode_records(std::uint16_t kind,
                                         const std::vector<RecordView>& records);

}  // namespace streamstate
