#include "core/lz4_block.h"

#include <lz4.h>

#include <cstring>

#include "core/byte_io.h"
#include "core/errors.h"

namespace streamstate {

std::size_t lz4_compressed_bound(std::size_t input_size) {
  if (input_size > static_cast<std::size_t>(LZ4_MAX_INPUT_SIZE)) {
    throw InvalidArgument("lz4: input of " + std::to_string(input_size) +
                          " bytes exceeds the LZ4 block limit of " +
                          std::to_string(LZ4_MAX_INPUT_SIZE) + " bytes");
  }
  return kLz4SizePrefix + static_cast<std::size_t>(LZ4_compressBound(static_cast<int>(input_size)));
}

std::size_t lz4_compress_into(std::string_view input, char* dst, std::size_t capacity) {
  const std::size_t bound = lz4_compressed_bound(input.size());
  if (capacity < bound) throw InvalidArgument("lz4: output buffer smaller than the bound");
  store_u32(dst, static_cast<std::uint32_t>(input.size()));
  const int written = LZ4_compress_default(input.data(), dst + kLz4SizePrefix,
                                           static_cast<int>(input.size()),
                                           static_cast<int>(bound - kLz4SizePrefix));
  if (written <= 0 && !input.empty()) throw std::runtime_error("lz4: compression failed");
  return kLz4SizePrefix + static_cast<std::size_t>(written);
}

std::string lz4_compress(std::string_view input) {
  std::string out(lz4_compressed_bound(input.size()), '\0');
  out.resize(lz4_compress_into(input, out.data(), out.size()));
  return out;
}

namespace {

// One literal run's length bytes after its token: the token holds 15 and then come
// (n - 15) / 255 bytes of 255 and one of the rest (the LZ4 block format's length coding).
std::size_t literal_length_bytes(std::size_t n) noexcept { return n < 15 ? 0 : (n - 15) / 255 + 1; }

}  // namespace

std::size_t lz4_stored_size(std::size_t input_size) {
  (void)lz4_compressed_bound(input_size);  // the same limit as a compressed block
  return kLz4SizePrefix + 1 + literal_length_bytes(input_size) + input_size;  // 1: the token
}

std::size_t lz4_stored_header(std::size_t input_size, char* dst) noexcept {
  store_u32(dst, static_cast<std::uint32_t>(input_size));
  std::size_t pos = kLz4SizePrefix;
  if (input_size < 15) {
    dst[pos++] = static_cast<char>(input_size << 4);
    return pos;
  }
  dst[pos++] = static_cast<char>(0xF0);
  std::size_t rest = input_size - 15;
  const std::size_t full = rest / 255;
  std::memset(dst + pos, 0xFF, full);
  pos += full;
  dst[pos++] = static_cast<char>(rest - full * 255);
  return pos;
}

std::size_t lz4_claimed_size(std::string_view compressed, std::size_t max_size) {
  if (compressed.size() < kLz4SizePrefix) {
    throw CorruptDataError("lz4: input of " + std::to_string(compressed.size()) +
                           " bytes is too short for the 4-byte size prefix");
  }
  const std::size_t claimed = load_u32(compressed.data());
  if (claimed > max_size) {
    throw CorruptDataError("lz4: claimed uncompressed size " + std::to_string(claimed) +
                           " exceeds max_size " + std::to_string(max_size));
  }
  // LZ4 cannot expand a block by more than ~255x, so a larger claim is a lie we refuse
  // before allocating for it.
  const std::size_t block = compressed.size() - kLz4SizePrefix;
  if (claimed > 255 * block + 16) {
    throw CorruptDataError("lz4: claimed uncompressed size " + std::to_string(claimed) +
                           " is impossible for a " + std::to_string(block) + "-byte block");
  }
  return claimed;
}

void lz4_decompress_into(std::string_view compressed, char* dst, std::size_t size) {
  const std::string_view block = compressed.substr(kLz4SizePrefix);
  char empty_sink = 0;  // LZ4 wants a valid pointer even for a zero-length output
  const int produced = LZ4_decompress_safe(block.data(), size == 0 ? &empty_sink : dst,
                                           static_cast<int>(block.size()),
                                           static_cast<int>(size));
  if (produced < 0) throw CorruptDataError("lz4: malformed compressed block");
  if (static_cast<std::size_t>(produced) != size) {
    throw CorruptDataError("lz4: block decompressed to " + std::to_string(produced) +
                           " bytes but the prefix claims " + std::to_string(size));
  }
}

std::string lz4_decompress(std::string_view compressed, std::size_t max_size) {
  const std::size_t size = lz4_claimed_size(compressed, max_size);
  std::string out(size, '\0');
  lz4_decompress_into(compressed, out.data(), size);
  return out;
}

}  // namespace streamstate
