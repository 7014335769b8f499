// The two key flavours of the numeric aggregation paths (partition aggregator, numeric
// aggregate store, spilling aggregator) and of FlatTable: int64 keys and byte-string keys.
// One struct per flavour says everything about its keys: the borrowed form a fold receives
// (`View`), the owned form a shared map stores (`Key`), the hash, the snapshot encoding,
// and how result columns hand keys out (`KeyColumn`).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/byte_io.h"
#include "core/hash.h"

namespace streamstate {

struct Int64Keys {
  using Key = std::int64_t;
  using View = std::int64_t;
  struct KeyColumn {
    std::vector<std::int64_t> keys;
    void reserve(std::size_t n) { keys.reserve(n); }
    void push_back(View k) { keys.push_back(k); }
    [[nodiscard]] std::size_t size() const noexcept { return keys.size(); }
  };
  // Snapshot key-type tag and the name errors and reprs use.
  static constexpr std::uint8_t kTag = 0;
  static constexpr std::string_view kName = "int64";

  // Stable across processes: shard and partition choices may be compared between runs.
  [[nodiscard]] static std::uint64_t hash(View k) noexcept {
    return hash_u64(static_cast<std::uint64_t>(k));
  }
  // Bytes a table keeps for the key outside its entry (int64 keys live in the entry).
  [[nodiscard]] static constexpr std::size_t arena_bytes(View /*k*/) noexcept { return 0; }

  static void encode(std::string& out, View k) { put_u64(out, static_cast<std::uint64_t>(k)); }
  [[nodiscard]] static View decode(ByteReader& in) { return static_cast<std::int64_t>(in.u64()); }
  [[nodiscard]] static std::size_t encoded_size(View /*k*/) noexcept { return 8; }
  [[nodiscard]] static View view_of(const Key& k) noexcept { return k; }
  [[nodiscard]] static bool less(View a, View b) noexcept { return a < b; }
};

struct BytesKeys {
  using Key = std::string;
  using View = std::string_view;
  // All keys back to back plus end offsets: one allocation instead of one per key.
  struct KeyColumn {
    std::string bytes;
    std::vector<std::size_t> ends;
    void reserve(std::size_t n) { ends.reserve(n); }
    void push_back(View k) {
      bytes.append(k);
      ends.push_back(bytes.size());
    }
    [[nodiscard]] std::size_t size() const noexcept { return ends.size(); }
  };
  static constexpr std::uint8_t kTag = 1;
  static constexpr std::string_view kName = "bytes";

  [[nodiscard]] static std::uint64_t hash(View k) noexcept { return hash_bytes(k); }
  [[nodiscard]] static constexpr std::size_t arena_bytes(View k) noexcept { return k.size(); }

  static void encode(std::string& out, View k) {
    put_u32(out, static_cast<std::uint32_t>(k.size()));
    out.append(k);
  }
  [[nodiscard]] static View decode(ByteReader& in) { return in.take(in.u32()); }
  [[nodiscard]] static std::size_t encoded_size(View k) noexcept { return 4 + k.size(); }
  [[nodiscard]] static View view_of(const Key& k) noexcept { return k; }
  [[nodiscard]] static bool less(View a, View b) noexcept { return a < b; }
};

// The key flavour whose View is `V` (for code templated on the key type itself).
template <class V>
struct KeysOf;
template <>
struct KeysOf<std::int64_t> {
  using type = Int64Keys;
};
template <>
struct KeysOf<std::string_view> {
  using type = BytesKeys;
};
template <class V>
using KeysFor = typename KeysOf<V>::type;

}  // namespace streamstate
