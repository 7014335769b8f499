#include "core/checksum.h"

#include <openssl/evp.h>

#include <array>
#include <cstddef>
#include <cstring>
#include <memory>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64)
#include <nmmintrin.h>
#define STREAMSTATE_HAVE_SSE42_PATH 1
#endif

namespace streamstate {
namespace {

constexpr std::uint32_t kPolyReflected = 0x82f63b78u;

// All helpers below work on the raw CRC register (no pre/post inversion), where the CRC is
// linear in (register, data) and can be shifted and combined.

using SliceTables = std::array<std::array<std::uint32_t, 256>, 8>;

constexpr SliceTables make_slice_tables() {
  SliceTables t{};
  for (std::uint32_t n = 0; n < 256; ++n) {
    std::uint32_t c = n;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? (c >> 1) ^ kPolyReflected : c >> 1;
    t[0][n] = c;
  }
  for (std::size_t n = 0; n < 256; ++n) {
    for (std::size_t k = 1; k < 8; ++k) t[k][n] = (t[k - 1][n] >> 8) ^ t[0][t[k - 1][n] & 0xffu];
  }
  return t;
}

constexpr SliceTables kSlice = make_slice_tables();

std::uint32_t portable_raw(std::uint32_t crc, const unsigned char* p, std::size_t n) noexcept {
  while (n >= 8) {
    std::uint32_t lo;
    std::uint32_t hi;
    std::memcpy(&lo, p, 4);
    std::memcpy(&hi, p + 4, 4);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    lo = __builtin_bswap32(lo);
    hi = __builtin_bswap32(hi);
#endif
    lo ^= crc;
    crc = kSlice[7][lo & 0xff] ^ kSlice[6][(lo >> 8) & 0xff] ^ kSlice[5][(lo >> 16) & 0xff] ^
          kSlice[4][lo >> 24] ^ kSlice[3][hi & 0xff] ^ kSlice[2][(hi >> 8) & 0xff] ^
          kSlice[1][(hi >> 16) & 0xff] ^ kSlice[0][hi >> 24];
    p += 8;
    n -= 8;
  }
  while (n--) crc = (crc >> 8) ^ kSlice[0][(crc ^ *p++) & 0xffu];
  return crc;
}

#ifdef STREAMSTATE_HAVE_SSE42_PATH

// Multiplication modulo the CRC polynomial in the reflected domain (bit 31 is x^0).
constexpr std::uint32_t mult_mod_poly(std::uint32_t a, std::uint32_t b) noexcept {
  std::uint32_t product = 0;
  for (std::uint32_t m = 1u << 31; m != 0; m >>= 1) {
    if (a & m) product ^= b;
    b = (b & 1u) ? (b >> 1) ^ kPolyReflected : b >> 1;
  }
  return product;
}

// x^(8 * n_bytes) mod P: the operator that appends n zero bytes to a raw register.
constexpr std::uint32_t x_pow_8n(std::size_t n_bytes) noexcept {
  std::uint32_t result = 1u << 31;  // x^0
  std::uint32_t square = 1u << 30;  // x^1, squared on each step
  for (std::size_t e = 8 * n_bytes; e != 0; e >>= 1) {
    if (e & 1) result = mult_mod_poly(square, result);
    square = mult_mod_poly(square, square);
  }
  return result;
}

using ShiftTable = std::array<std::array<std::uint32_t, 256>, 4>;

// Byte-wise tables for "shift this register over n zero bytes", so combining the three
// interleaved streams costs 8 lookups instead of re-running the CRC over zeros.
constexpr ShiftTable make_shift_table(std::size_t n_bytes) {
  const std::uint32_t op = x_pow_8n(n_bytes);
  ShiftTable t{};
  for (std::uint32_t k = 0; k < 4; ++k) {
    for (std::uint32_t b = 0; b < 256; ++b) t[k][b] = mult_mod_poly(op, b << (8 * k));
  }
  return t;
}

constexpr std::size_t kLongStream = 8192;  // bytes per stream in the long loop
constexpr std::size_t kShortStream = 256;  // bytes per stream in the short loop
constexpr ShiftTable kShiftLong = make_shift_table(kLongStream);
constexpr ShiftTable kShiftShort = make_shift_table(kShortStream);

inline std::uint32_t shift(const ShiftTable& t, std::uint32_t crc) noexcept {
  return t[0][crc & 0xff] ^ t[1][(crc >> 8) & 0xff] ^ t[2][(crc >> 16) & 0xff] ^ t[3][crc >> 24];
}

// The crc32 instruction has a latency of 3 cycles and a throughput of 1 per cycle, so three
// independent streams keep the unit busy; their registers are merged with the shift tables.
template <std::size_t StreamBytes>
__attribute__((target("sse4.2"))) inline std::uint64_t three_way(std::uint64_t crc0,
                                                                 const unsigned char*& p,
                                                                 std::size_t& n,
                                                                 const ShiftTable& table) noexcept {
  while (n >= 3 * StreamBytes) {
    std::uint64_t crc1 = 0;
    std::uint64_t crc2 = 0;
    const unsigned char* const end = p + StreamBytes;
    do {
      std::uint64_t w0;
      std::uint64_t w1;
      std::uint64_t w2;
      std::memcpy(&w0, p, 8);
      std::memcpy(&w1, p + StreamBytes, 8);
      std::memcpy(&w2, p + 2 * StreamBytes, 8);
      crc0 = _mm_crc32_u64(crc0, w0);
      crc1 = _mm_crc32_u64(crc1, w1);
      crc2 = _mm_crc32_u64(crc2, w2);
      p += 8;
    } while (p < end);
    crc0 = shift(table, static_cast<std::uint32_t>(crc0)) ^ crc1;
    crc0 = shift(table, static_cast<std::uint32_t>(crc0)) ^ crc2;
    p += 2 * StreamBytes;
    n -= 3 * StreamBytes;
  }
  return crc0;
}

// One stream of 8-byte words, then the last few bytes: short inputs, and the tail of the
// three-way path, which would gain nothing from splitting what is left.
__attribute__((target("sse4.2"))) inline std::uint32_t hardware_single_raw(
    std::uint32_t crc, const unsigned char* p, std::size_t n) noexcept {
  std::uint64_t c = crc;
  while (n >= 8) {
    std::uint64_t w;
    std::memcpy(&w, p, 8);
    c = _mm_crc32_u64(c, w);
    p += 8;
    n -= 8;
  }
  while (n--) c = _mm_crc32_u8(static_cast<std::uint32_t>(c), *p++);
  return static_cast<std::uint32_t>(c);
}

__attribute__((target("sse4.2"))) std::uint32_t hardware_raw(std::uint32_t crc,
                                                             const unsigned char* p,
                                                             std::size_t n) noexcept {
  std::uint64_t c = crc;
  while (n && (reinterpret_cast<std::uintptr_t>(p) & 7u)) {
    c = _mm_crc32_u8(static_cast<std::uint32_t>(c), *p++);
    --n;
  }
  c = three_way<kLongStream>(c, p, n, kShiftLong);
  c = three_way<kShortStream>(c, p, n, kShiftShort);
  // _mm_crc32_u64 leaves the upper half zero, so the narrowing loses nothing.
  return hardware_single_raw(static_cast<std::uint32_t>(c), p, n);
}

bool detect_hardware() noexcept { return __builtin_cpu_supports("sse4.2") != 0; }

#else
bool detect_hardware() noexcept { return false; }
#endif

const bool kUseHardware = detect_hardware();

}  // namespace

std::uint32_t crc32c_portable(std::string_view data, std::uint32_t crc) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(data.data());
  return ~portable_raw(~crc, p, data.size());
}

std::uint32_t crc32c(std::string_view data, std::uint32_t crc) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(data.data());
#ifdef STREAMSTATE_HAVE_SSE42_PATH
  if (kUseHardware) return ~hardware_raw(~crc, p, data.size());
#endif
  return ~portable_raw(~crc, p, data.size());
}

std::uint32_t crc32c_single_stream(std::string_view data, std::uint32_t crc) noexcept {
  const auto* p = reinterpret_cast<const unsigned char*>(data.data());
#ifdef STREAMSTATE_HAVE_SSE42_PATH
  if (kUseHardware) return ~hardware_single_raw(~crc, p, data.size());
#endif
  return ~portable_raw(~crc, p, data.size());
}

bool crc32c_is_hardware() noexcept { return kUseHardware; }

std::string sha256_digest(std::string_view data) {
  std::string out(32, '\0');
  unsigned int written = 0;
  if (EVP_Digest(data.data(), data.size(), reinterpret_cast<unsigned char*>(out.data()), &written,
                 EVP_sha256(), nullptr) != 1 ||
      written != 32) {
    throw std::runtime_error("OpenSSL EVP_Digest(SHA-256) failed");
  }
  return out;
}

std::string sha256_hex(std::string_view data) {
  static constexpr char kHex[] = "0123456789abcdef";
  const std::string raw = sha256_digest(data);
  std::string hex(64, '\0');
  for (std::size_t i = 0; i < raw.size(); ++i) {
    const auto b = static_cast<unsigned char>(raw[i]);
    hex[2 * i] = kHex[b >> 4];
    hex[2 * i + 1] = kHex[b & 0xf];
  }
  return hex;
}

}  // namespace streamstate
