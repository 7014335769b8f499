// LZ4 block compression in the size-prepended layout: a u32 little-endian uncompressed size,
// then one raw LZ4 block. The layout of lz4_flex's compress_prepend_size and python-lz4's
// block.compress(store_size=True).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace streamstate {

inline constexpr std::size_t kLz4SizePrefix = 4;
inline constexpr std::size_t kDefaultMaxDecompressedSize = std::size_t{1} << 30;

// Upper bound of the size-prepended output for `input_size` bytes; throws InvalidArgument
// above LZ4's 2 GB block limit.
[[nodiscard]] std::size_t lz4_compressed_bound(std::size_t input_size);

// Compresses into dst (capacity from lz4_compressed_bound); returns bytes written.
std::size_t lz4_compress_into(std::string_view input, char* dst, std::size_t capacity);

[[nodiscard]] std::string lz4_compress(std::string_view input);

// The stored form of a size-prepended block: the input as one run of literals, a valid LZ4
// block that any decoder reads, written at memcpy speed with no match search. For data LZ4
// barely shrinks (float partials) the search costs more CPU than the bytes it saves cost to
// hash and write. lz4_stored_header() writes the size prefix and the run's token and length
// bytes for `input_size` bytes into dst and returns their length: the input bytes follow,
// and the block ends with them. lz4_stored_size() is the whole block's size (header and
// input; at most lz4_compressed_bound), and throws as that does above LZ4's block limit.
[[nodiscard]] std::size_t lz4_stored_size(std::size_t input_size);
std::size_t lz4_stored_header(std::size_t input_size, char* dst) noexcept;

// The uncompressed size a size-prepended block claims, validated before any allocation:
// at most max_size, and no more than LZ4's best ratio allows for the block's length.
[[nodiscard]] std::size_t lz4_claimed_size(std::string_view compressed, std::size_t max_size);

// Decompresses into dst, which must hold exactly lz4_claimed_size() bytes; throws
// CorruptDataError when the block is malformed or does not produce exactly that many.
void lz4_decompress_into(std::string_view compressed, char* dst, std::size_t size);

[[nodiscard]] std::string lz4_decompress(std::string_view compressed,
                                         std::size_t max_size = kDefaultMaxDecompressedSize);

}  // namespace streamstate
