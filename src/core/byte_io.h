// Little-endian fixed-width integers and a bounds-checked reader. Every decoder in the
// project reads through ByteReader, so running past the end of the input is an exception,
// never an out-of-bounds read.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "core/errors.h"

namespace streamstate {

inline void put_u16(std::string& out, std::uint16_t v) {
  const char b[2] = {static_cast<char>(v & 0xff), static_cast<char>(v >> 8)};
  out.append(b, 2);
}

inline void put_u32(std::string& out, std::uint32_t v) {
  char b[4];
  for (int i = 0; i < 4; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  out.append(b, 4);
}

inline void put_u64(std::string& out, std::uint64_t v) {
  char b[8];
  for (int i = 0; i < 8; ++i) b[i] = static_cast<char>((v >> (8 * i)) & 0xff);
  out.append(b, 8);
}

inline void put_f64(std::string& out, double v) {
  std::uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  put_u64(out, bits);
}

inline void store_u32(char* dst, std::uint32_t v) noexcept {
  for (int i = 0; i < 4; ++i) dst[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

inline void store_u64(char* dst, std::uint64_t v) noexcept {
  for (int i = 0; i < 8; ++i) dst[i] = static_cast<char>((v >> (8 * i)) & 0xff);
}

inline void store_f64(char* dst, double v) noexcept {
  std::uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  store_u64(dst, bits);
}

namespace byte_io_detail {
// Copies n bytes, sizeof(Word) <= n <= 2 * sizeof(Word), as two overlapping word moves.
template <class Word>
inline void copy_two_words(char* dst, const char* src, std::size_t n) noexcept {
  Word head;
  Word tail;
  std::memcpy(&head, src, sizeof(Word));
  std::memcpy(&tail, src + n - sizeof(Word), sizeof(Word));
  std::memcpy(dst, &head, sizeof(Word));
  std::memcpy(dst + n - sizeof(Word), &tail, sizeof(Word));
}
}  // namespace byte_io_detail

// Keys and values are mostly a few bytes long, where a call to memcpy costs more than the
// copy; two overlapping word moves cover 1..16 bytes without a loop or a call.
inline void copy_bytes(char* dst, const char* src, std::size_t n) noexcept {
  if (n > 16) {
    std::memcpy(dst, src, n);
  } else if (n >= 8) {
    byte_io_detail::copy_two_words<std::uint64_t>(dst, src, n);
  } else if (n >= 4) {
    byte_io_detail::copy_two_words<std::uint32_t>(dst, src, n);
  } else if (n > 0) {
    dst[0] = src[0];
    dst[n / 2] = src[n / 2];
    dst[n - 1] = src[n - 1];
  }
}

[[nodiscard]] inline std::uint16_t load_u16(const char* p) noexcept {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return static_cast<std::uint16_t>(u[0] | (u[1] << 8));
}

[[nodiscard]] inline std::uint32_t load_u32(const char* p) noexcept {
  const auto* u = reinterpret_cast<const unsigned char*>(p);
  return static_cast<std::uint32_t>(u[0]) | (static_cast<std::uint32_t>(u[1]) << 8) |
         (static_cast<std::uint32_t>(u[2]) << 16) | (static_cast<std::uint32_t>(u[3]) << 24);
}

[[nodiscard]] inline std::uint64_t load_u64(const char* p) noexcept {
  return static_cast<std::uint64_t>(load_u32(p)) |
         (static_cast<std::uint64_t>(load_u32(p + 4)) << 32);
}

// Reads from [data, data + size); every read checks the remaining length first and throws
// CorruptDataError naming `what` and the offset when the input is too short.
class ByteReader {
 public:
  ByteReader(std::string_view data, const char* what) noexcept : data_(data), what_(what) {}

  [[nodiscard]] std::size_t offset() const noexcept { return pos_; }
  [[nodiscard]] std::size_t remaining() const noexcept { return data_.size() - pos_; }
  [[nodiscard]] bool at_end() const noexcept { return pos_ == data_.size(); }

  std::uint16_t u16() { return load_u16(take(2).data()); }
  std::uint32_t u32() { return load_u32(take(4).data()); }
  std::uint64_t u64() { return load_u64(take(8).data()); }
  double f64() {
    const std::uint64_t bits = u64();
    double v;
    std::memcpy(&v, &bits, sizeof v);
    return v;
  }

  // A view of the next n bytes (no copy); throws if fewer than n remain.
  std::string_view take(std::size_t n) {
    if (n > remaining()) {
      throw CorruptDataError(std::string(what_) + ": truncated at byte " + std::to_string(pos_) +
                             " (needed " + std::to_string(n) + " bytes, " +
                             std::to_string(remaining()) + " left)");
    }
    const std::string_view out = data_.substr(pos_, n);
    pos_ += n;
    return out;
  }

 private:
  std::string_view data_;
  const char* what_;
  std::size_t pos_ = 0;
};

}  // namespace streamstate
