// The checkpoint-batch format LCB1: the state blobs of one checkpoint cycle packed into a
// single LZ4-compressed object, byte-compatible with the LaminarDB checkpoint batcher.
//
//   [magic "LCB1"][u32 version][u32 entry_count][u32 uncompressed_size]
//   [u32 CRC32C of everything after the header]            <- version 2 only
//   [u32 uncompressed_size][one raw LZ4 block]              <- the "compressed body"
//   decoded body: entry_count x ([u32 key_len][key, UTF-8][u32 data_len][data])
//
// All integers are little-endian. The CRC is the plain (unmasked) CRC-32C of the compressed
// body including its 4-byte size prefix, as the reference computes it. We write version 2
// and read versions 1 and 2; decoding is stricter than the reference (see decode_batch).
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "core/lz4_block.h"

namespace streamstate {

inline constexpr char kBatchMagic[4] = {'L', 'C', 'B', '1'};
inline constexpr std::uint32_t kBatchVersionUnchecked = 1;  // no checksum field
inline constexpr std::uint32_t kBatchVersionChecked = 2;    // CRC32C after the size field
inline constexpr std::size_t kBatchHeaderSizeV1 = 16;
inline constexpr std::size_t kBatchHeaderSizeV2 = 20;
inline constexpr std::size_t kBatchEntryOverhead = 8;  // the two u32 length fields
// The format's size fields are u32, so no body can exceed 4 GiB - 1 ...
inline constexpr std::size_t kBatchFormatMaxBody = 0xFFFFFFFFu;
// ... and one LZ4 block holds at most LZ4_MAX_INPUT_SIZE bytes (checked against lz4.h in the
// .cpp), so that is the real limit for encoding and for decoding.
inline constexpr std::size_t kBatchMaxBody = 0x7E000000u;

struct BatchEntryView {
  std::string_view key;
  std::string_view data;
};

// The decoded body size of `entries`. Throws InvalidArgument when it would exceed the
// format's 4 GiB limit or LZ4's block limit, naming both sizes.
[[nodiscard]] std::size_t batch_body_size(std::span<const BatchEntryView> entries);

// How the body is stored. kLz4 compresses it; kStored writes it as one run of LZ4 literals
// (a valid block every reader decodes, at memcpy speed: see lz4_stored_header); kAuto
// compresses a sample of a large body first and stores the body unless LZ4 halves it. On
// float partials (a store snapshot: LZ4 saves 15-22%) the match search cost ~3x a stored
// encode, more than hashing and writing the saved bytes; it pays for redundant data.
enum class BatchCompression : std::uint8_t { kLz4, kStored, kAuto };

// Capacity encode_batch_into needs for a body of `body_size` bytes (the worst case, for
// incompressible data).
[[nodiscard]] std::size_t batch_encoded_bound(std::size_t body_size);

// Writes a version-2 batch of `entries` (whose body size is `body_size`, from
// batch_body_size) into dst and returns its length. Throws InvalidArgument for a key that is
// not valid UTF-8, so the encoder never writes a batch the decoder would refuse.
std::size_t encode_batch_into(std::span<const BatchEntryView> entries, std::size_t body_size,
                              char* dst, std::size_t capacity,
                              BatchCompression compression = BatchCompression::kLz4);

[[nodiscard]] std::string encode_batch(std::span<const BatchEntryView> entries,
                                       BatchCompression compression = BatchCompression::kLz4);

// What kAuto chooses for `entries` (kLz4 or kStored): bodies under kAutoSampleMin bytes are
// compressed; larger ones by how well kAutoSampleSize bytes from their middle compress.
inline constexpr std::size_t kAutoSampleMin = std::size_t{1} << 20;
inline constexpr std::size_t kAutoSampleSize = std::size_t{64} << 10;
[[nodiscard]] BatchCompression choose_batch_compression(std::span<const BatchEntryView> entries,
                                                        std::size_t body_size);

// A decoded batch: the decompressed body and views of its entries into it. Movable, not
// copyable; the views stay valid while the object lives.
class DecodedBatch {
 public:
  DecodedBatch() = default;
  DecodedBatch(DecodedBatch&&) noexcept = default;
  DecodedBatch& operator=(DecodedBatch&&) noexcept = default;
  DecodedBatch(const DecodedBatch&) = delete;
  DecodedBatch& operator=(const DecodedBatch&) = delete;
  ~DecodedBatch();

  [[nodiscard]] std::uint32_t version() const noexcept { return version_; }
  [[nodiscard]] std::size_t body_size() const noexcept { return body_size_; }
  [[nodiscard]] const std::vector<BatchEntryView>& entries() const noexcept { return entries_; }

  // Copies every entry's data into destinations[i] (each at least entries()[i].data.size()
  // bytes), splitting large bodies across TBB workers: the copy into freshly allocated
  // output pages is as expensive as the decompression itself.
  void copy_data_to(std::span<char* const> destinations) const;

 private:
  friend DecodedBatch decode_batch(std::string_view raw, std::size_t max_body_size);

  std::unique_ptr<char[]> body_;
  std::size_t body_capacity_ = 0;
  std::size_t body_size_ = 0;
  std::vector<BatchEntryView> entries_;
  std::uint32_t version_ = 0;
};

// Decodes a version 1 or 2 batch. Everything is validated before this returns, and every
// failure is a CorruptDataError naming the problem: too short, "invalid batch magic",
// "unsupported batch version N", "CRC32C mismatch" (v2), a header size that disagrees with
// the body's size prefix, a size or entry count larger than the input can hold (checked
// before allocating: at most LZ4's ~255x expansion of the input), a malformed LZ4 block, a
// truncated entry, a key that is not valid UTF-8, an entry count that does not match the
// body, or bytes left over after the last entry. A body larger than `max_body_size` (the
// total decoded size: keys, data and their length fields) is refused the same way, before
// anything is allocated for it.
[[nodiscard]] DecodedBatch decode_batch(
    std::string_view raw, std::size_t max_body_size = kDefaultMaxDecompressedSize);

// True when `text` is well-formed UTF-8 (no overlong forms, surrogates or code points above
// U+10FFFF): exactly what Python's strict UTF-8 codec accepts.
[[nodiscard]] bool is_valid_utf8(std::string_view text) noexcept;

}  // namespace streamstate
