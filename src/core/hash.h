// The core's one hash family: a 64-bit integer mix and a byte-string hash, both seedable.
//
// Seeds. kStableSeed gives the same value in every process and on every run: use it where
// a hash decides something another process must agree with (routing, partitioning, shard
// choice that survives a restore). process_seed() is drawn at random once per process:
// use it where an adversary feeding keys could otherwise precompute collisions (an index
// over user keys that lives as long as the process). Hash values are never persisted.
//
// Quality. Both outputs avalanche over all 64 bits, so callers may take any bits they
// like: tables take the low bits for a slot and the high 32 as a tag, the partition
// aggregator the top 7 for a shard.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace streamstate {

inline constexpr std::uint64_t kStableSeed = 0;

namespace hash_detail {
// std::random_device; the clock and an address where there is none.
[[nodiscard]] std::uint64_t draw_process_seed() noexcept;
}  // namespace hash_detail

// Random, drawn once per process. Inline so a hot loop pays a guard check, not a call.
[[nodiscard]] inline std::uint64_t process_seed() noexcept {
  static const std::uint64_t seed = hash_detail::draw_process_seed();
  return seed;
}

// An independent seed for the n-th use of one hash, e.g. the n-th level of a recursive
// partitioning that must see fresh bits at every level (odd multiples of the golden ratio).
[[nodiscard]] constexpr std::uint64_t nth_seed(unsigned n) noexcept {
  return 0x9e3779b97f4a7c15ULL * (2 * static_cast<std::uint64_t>(n) + 1);
}

// murmur3's 64-bit finalizer: a bijection with full avalanche, so sequential or strided
// integers spread evenly over every bit.
[[nodiscard]] constexpr std::uint64_t mix64(std::uint64_t x) noexcept {
  x ^= x >> 33;
  x *= 0xff51afd7ed558ccdULL;
  x ^= x >> 33;
  x *= 0xc4ceb9fe1a85ec53ULL;
  x ^= x >> 33;
  return x;
}

// Hash of a 64-bit integer (or of another hash, to draw fresh bits from it).
[[nodiscard]] constexpr std::uint64_t hash_u64(std::uint64_t x,
                                               std::uint64_t seed = kStableSeed) noexcept {
  return mix64(x + seed);
}

namespace hash_detail {

__extension__ typedef unsigned __int128 u128;  // NOLINT: GCC/Clang extension, pedantic-safe

// 64x64 -> 128 multiply folded to 64 bits (the core step of wyhash-style hashing).
[[nodiscard]] inline std::uint64_t fold_multiply(std::uint64_t a, std::uint64_t b) noexcept {
  const u128 product = static_cast<u128>(a) * b;
  return static_cast<std::uint64_t>(product) ^ static_cast<std::uint64_t>(product >> 64);
}

[[nodiscard]] inline std::uint64_t load64(const char* p) noexcept {
  std::uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

[[nodiscard]] inline std::uint64_t load32(const char* p) noexcept {
  std::uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

}  // namespace hash_detail

// Hash of a byte string: one multiply-fold per 16 bytes, the last 1..16 bytes read as two
// possibly overlapping words (fixed-size loads: ~5x faster on short keys than a copy of
// the odd tail), the length mixed in first so "a" and "a\0" differ.
[[nodiscard]] inline std::uint64_t hash_bytes(std::string_view s,
                                              std::uint64_t seed = kStableSeed) noexcept {
  using hash_detail::fold_multiply;
  using hash_detail::load32;
  using hash_detail::load64;
  constexpr std::uint64_t kA = 0x9e3779b97f4a7c15ULL;
  constexpr std::uint64_t kB = 0xd1b54a32d192ed03ULL;
  const char* p = s.data();
  std::size_t n = s.size();
  std::uint64_t h = seed ^ (static_cast<std::uint64_t>(n) * kB);
  while (n > 16) {
    h = fold_multiply(load64(p) ^ kA, load64(p + 8) ^ h);
    p += 16;
    n -= 16;
  }
  std::uint64_t a = 0;
  std::uint64_t b = 0;
  if (n >= 8) {
    a = load64(p);
    b = load64(p + n - 8);
  } else if (n >= 4) {
    a = load32(p);
    b = load32(p + n - 4);
  } else if (n > 0) {
    const auto byte = [p](std::size_t i) {
      return static_cast<std::uint64_t>(static_cast<unsigned char>(p[i]));
    };
    a = (byte(0) << 16) | (byte(n / 2) << 8) | byte(n - 1);
  }
  h = fold_multiply(a ^ kA ^ h, b ^ kB);
  return fold_multiply(h ^ kA, kB);
}

}  // namespace streamstate
