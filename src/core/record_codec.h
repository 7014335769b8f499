// The one container every state snapshot in the project is written in.
//
//   [magic "SSRC"][u16 LE format version][u16 LE kind][u32 LE entry count]
//   entry_count x ([u32 LE key length][key][u32 LE value length][value])
//   [u32 LE masked CRC32C of every byte before it]
//
// The kind names the component that wrote the snapshot, so restoring an aggregate store
// from a state-backend checkpoint fails loudly instead of producing nonsense.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace streamstate {

enum class RecordKind : std::uint16_t {
  kUser = 0,                   // free for callers of encode_records
  kAggregateStore = 1,         // opaque partials keyed by (group, partition)
  kNumericAggregateStore = 2,  // typed numeric partials
  kStateBackend = 3,           // keyed state backend checkpoint
  kSpillRun = 4,               // spilling aggregator
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
  [[nodiscard]] std::size_t count() const noexcept { return count_; }
  // Seals the container (patches the count, appends the CRC) and hands the bytes over.
  [[nodiscard]] std::string finish() &&;

 private:
  std::string out_;
  std::size_t count_ = 0;
};

struct RecordView {
  std::string_view key;
  std::string_view value;
};

// Validates the whole container on construction (magic, version, CRC, every length, no
// trailing bytes) and throws CorruptDataError saying what is wrong; once constructed,
// iteration cannot fail. Views point into the caller's buffer, which must outlive the reader.
class RecordReader {
 public:
  explicit RecordReader(std::string_view data);

  [[nodiscard]] std::uint16_t kind() const noexcept { return kind_; }
  [[nodiscard]] std::size_t count() const noexcept { return count_; }
  // Throws CorruptDataError unless the container was written by `expected`.
  void expect_kind(RecordKind expected) const;

  // Fills `out` with the next record; false after the last one.
  bool next(RecordView& out) noexcept;

 private:
  std::string_view body_;  // the records, between header and trailer
  std::size_t pos_ = 0;
  std::size_t count_ = 0;
  std::uint16_t kind_ = 0;
};

[[nodiscard]] std::string encode_records(std::uint16_t kind,
                                         const std::vector<RecordView>& records);

}  // namespace streamstate
