// CRC-32C (Castagnoli) and SHA-256: the two digests every format in the project uses.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace streamstate {

// CRC-32C of data, continuing from a previous result `crc` (0 to start). Uses the SSE4.2
// crc32 instruction over three interleaved streams when the CPU has it, chosen once at
// run time; otherwise a slicing-by-8 table.
[[nodiscard]] std::uint32_t crc32c(std::string_view data, std::uint32_t crc = 0) noexcept;

// The portable table implementation, exposed so tests and benchmarks can compare.
[[nodiscard]] std::uint32_t crc32c_portable(std::string_view data, std::uint32_t crc = 0) noexcept;

// The hardware instruction over one stream (no interleaving), for the benchmark that shows
// what the three-way interleave buys; falls back to the portable path without SSE4.2.
[[nodiscard]] std::uint32_t crc32c_single_stream(std::string_view data, std::uint32_t crc = 0) noexcept;

// True when crc32c() uses the hardware instruction on this machine.
[[nodiscard]] bool crc32c_is_hardware() noexcept;

// LevelDB-style masking: a CRC stored inside data that is itself checksummed should not be
// the raw CRC, or CRCs of data containing CRCs degenerate.
[[nodiscard]] constexpr std::uint32_t crc32c_mask(std::uint32_t crc) noexcept {
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}
[[nodiscard]] constexpr std::uint32_t crc32c_unmask(std::uint32_t masked) noexcept {
  const std::uint32_t rot = masked - 0xa282ead8u;
  return (rot >> 17) | (rot << 15);
}

// SHA-256 through OpenSSL's EVP interface; 32 raw bytes, or 64 lowercase hex characters.
[[nodiscard]] std::string sha256_digest(std::string_view data);
[[nodiscard]] std::string sha256_hex(std::string_view data);

}  // namespace streamstate
