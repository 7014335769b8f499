// One entry of the state backend: the bytes it is stored in (exactly its checkpoint
// record) and the 16-byte slot that points at them.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string_view>

#include "core/byte_io.h"
#include "core/state_backend.h"

namespace streamstate::state_detail {

// The checkpoint is a record container: one header record, then one record per entry,
//   [u32 key length][key][u32 record length][u8 flags][f64 expires_at if flags & 1][value]
// and an entry in memory is stored in exactly those bytes, so a checkpoint copies entries
// verbatim and a restore can use the snapshot's bytes as they are.
inline constexpr std::string_view kHeaderKey = "state_backend";
inline constexpr std::uint32_t kLayoutVersion = 1;
inline constexpr std::size_t kHeaderValueSize = 12;  // u64 checkpoint id, u32 layout version
inline constexpr unsigned char kFlagExpires = 1;
inline constexpr std::size_t kEntryOverhead = 4 + 4 + 1;  // two lengths and the flags byte
inline constexpr std::size_t kExpirySize = 8;

// A checkpoint delta (kind kStateBackendDelta) is the same container: a header record
//   key kHeaderKey, value u32 layout version, u64 checkpoint id, u64 parent checkpoint id,
//                  u32 parent identity, u64 sequence, f64 now
// then one record per changed key in key order: the entry as it is now, exactly as a full
// checkpoint stores it, or a removal: the key with the one-byte value kFlagRemoved (a
// flag a full checkpoint never carries, so neither kind of record passes for the other).
inline constexpr std::uint32_t kDeltaLayoutVersion = 1;
inline constexpr std::size_t kDeltaHeaderValueSize = 4 + 8 + 8 + 4 + 8 + 8;
inline constexpr unsigned char kFlagRemoved = 2;

// An entry: 16 bytes, 16-aligned, so a slot never straddles two cache lines. The key length
// carries a flag in its top bit (the entry has an expiry field); a deleted slot keeps its
// entry (its key still orders the run until the next compaction) and marks value_len.
struct alignas(16) Slot {
  const char* entry;
  std::uint32_t key_bits;
  std::uint32_t value_len;
};
static_assert(sizeof(Slot) == 16);

inline constexpr std::uint32_t kHasExpiry = std::uint32_t{1} << 31;
inline constexpr std::uint32_t kDead = std::numeric_limits<std::uint32_t>::max();

// What a Slot records about an entry besides where it lies.
struct EntryShape {
  std::uint32_t key_bits = 0;
  std::uint32_t value_len = 0;
};

[[nodiscard]] constexpr std::uint32_t key_len(const Slot& s) noexcept {
  return s.key_bits & ~kHasExpiry;
}
[[nodiscard]] constexpr bool has_expiry(const Slot& s) noexcept {
  return (s.key_bits & kHasExpiry) != 0;
}
[[nodiscard]] constexpr std::size_t entry_size(std::size_t key, std::size_t value,
                                               bool expiring) noexcept {
  return kEntryOverhead + key + value + (expiring ? kExpirySize : 0);
}
[[nodiscard]] inline std::size_t entry_size(const Slot& s, std::uint32_t value_len) noexcept {
  return entry_size(key_len(s), value_len, has_expiry(s));
}
[[nodiscard]] inline const char* header_of(const Slot& s) noexcept {
  return s.entry + 8 + key_len(s);  // the flags byte
}
[[nodiscard]] inline double expiry_of(const Slot& s) noexcept {
  return has_expiry(s) ? std::bit_cast<double>(load_u64(header_of(s) + 1)) : kNeverExpires;
}

// Writes one entry at `out` (entry_size(...) bytes).
inline void write_entry(char* out, std::string_view key, std::string_view value, bool expiring,
                        double expires_at) noexcept {
  store_u32(out, static_cast<std::uint32_t>(key.size()));
  copy_bytes(out + 4, key.data(), key.size());
  char* header = out + 4 + key.size();
  store_u32(header, static_cast<std::uint32_t>(1 + (expiring ? kExpirySize : 0) + value.size()));
  header[4] = static_cast<char>(expiring ? kFlagExpires : 0);
  char* body = header + 5;
  if (expiring) {
    const auto bits = std::bit_cast<std::uint64_t>(expires_at);
    store_u32(body, static_cast<std::uint32_t>(bits));
    store_u32(body + 4, static_cast<std::uint32_t>(bits >> 32));
    body += kExpirySize;
  }
  copy_bytes(body, value.data(), value.size());
}

}  // namespace streamstate::state_detail
