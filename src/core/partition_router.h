// Routing rows to partitions: the same key goes to the same partition in every process,
// run, version and machine, because the partition is a pure function of the key's bytes
// (or int64 value) through the core's seedless hash (hash.h, kStableSeed).
//
// Key groups (Flink's scheme): a key's group is fast_range(fresh, key_groups), where fresh
// = hash_u64(K::hash(key), kRoutingSeed) is the table hash re-mixed with a seed of its own
// (taking bits of the table hash directly would correlate with the bits the tables use:
// low bits for a slot, top bits for a shard; with hash % 2, partition 0 would only ever
// fill even slots). The group count G is fixed for the life of a job (recorded in its
// snapshots); the partition count P <= G may change between runs. Partition p owns the
// contiguous groups g with floor(g * P / G) == p, that is [ceil(p*G/P), ceil((p+1)*G/P))
// (key_group_range), so rescaling moves whole groups and a snapshot sectioned by group can
// be read range by range.
//
// The owner of a key is floor(floor(fresh * G / 2^64) * P / G). When P divides G (every
// power of two P <= G for the default G = 256) this equals floor(fresh * P / 2^64), the
// partition routing gave before key groups existed: nothing moves. For other P, the keys
// of the one group each of the P - 1 boundaries of the old P-way split cuts through move
// to the neighbouring partition: less than (P - 1) / G of them (P = 3, G = 256: 1 key in
// 256; P = 7: 1 in 87).
//
// Changing kRoutingSeed or these formulas moves keys between partitions of restored jobs:
// the known-answer tests (C++ and Python) pin them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>
#include <vector>

#include "core/hash.h"
#include "core/key_traits.h"

namespace streamstate {

inline constexpr std::uint64_t kRoutingSeed = nth_seed(17);
inline constexpr std::uint32_t kDefaultKeyGroups = 256;
inline constexpr std::uint32_t kMaxKeyGroups = 65536;

// The key group in [0, key_groups) of a key whose table hash is `hash`.
[[nodiscard]] inline std::uint32_t key_group_of_hash(std::uint64_t hash,
                                                     std::uint32_t key_groups) noexcept {
  __extension__ typedef unsigned __int128 u128;  // NOLINT: GCC/Clang extension
  const std::uint64_t fresh = hash_u64(hash, kRoutingSeed);
  return static_cast<std::uint32_t>((static_cast<u128>(fresh) * key_groups) >> 64);
}

// The partition in [0, partitions) owning key group `group` (< key_groups; partitions <=
// key_groups).
[[nodiscard]] constexpr std::uint32_t owner_of_group(std::uint32_t group, std::uint32_t partitions,
                                                     std::uint32_t key_groups) noexcept {
  return static_cast<std::uint32_t>(std::uint64_t{group} * partitions / key_groups);
}

// The groups partition p owns: [first, end), never empty when partitions <= key_groups.
struct KeyGroupRange {
  std::uint32_t first;
  std::uint32_t end;
};
[[nodiscard]] constexpr KeyGroupRange key_group_range(std::uint32_t partition,
                                                      std::uint32_t partitions,
                                                      std::uint32_t key_groups) noexcept {
  // ceil(p * G / P): the smallest g with floor(g * P / G) >= p.
  const auto start = [&](std::uint64_t p) {
    return static_cast<std::uint32_t>((p * key_groups + partitions - 1) / partitions);
  };
  return {start(partition), start(std::uint64_t{partition} + 1)};
}

// Throws InvalidArgument unless 1 <= key_groups <= kMaxKeyGroups and 1 <= partitions <=
// key_groups (every partition must own at least one group).
void check_key_groups(std::uint32_t partitions, std::uint32_t key_groups);

// The partition in [0, partitions) of a key whose table hash is `hash`: the owner of its
// group.
[[nodiscard]] inline std::uint32_t partition_of_hash(std::uint64_t hash, std::uint32_t partitions,
                                                     std::uint32_t key_groups) noexcept {
  return owner_of_group(key_group_of_hash(hash, key_groups), partitions, key_groups);
}

template <class K>
[[nodiscard]] std::uint32_t key_group_of(typename K::View key, std::uint32_t key_groups) noexcept {
  return key_group_of_hash(K::hash(key), key_groups);
}

template <class K>
[[nodiscard]] std::uint32_t partition_of(typename K::View key, std::uint32_t partitions,
                                         std::uint32_t key_groups = kDefaultKeyGroups) noexcept {
  return partition_of_hash(K::hash(key), partitions, key_groups);
}

// Which rows go where, as a counting sort: partition p's rows are
// order[bounds[p], bounds[p + 1]), ascending (a stable partition of the batch).
struct PartitionPlan {
  std::vector<std::size_t> bounds;
  std::vector<std::size_t> order;

  [[nodiscard]] std::size_t rows_of(std::uint32_t p) const noexcept {
    return bounds[p + 1] - bounds[p];
  }
};

// One pass hashes every key (key_at(i) -> K::View) and counts per partition, prefix sums
// place the partitions, a second pass over the remembered partitions scatters row indices.
// `partitions` <= `key_groups` (check_key_groups).
template <class K, class KeyAt>
[[nodiscard]] PartitionPlan plan_partitions(KeyAt&& key_at, std::size_t n,
                                            std::uint32_t partitions,
                                            std::uint32_t key_groups = kDefaultKeyGroups) {
  std::vector<std::uint32_t> part(n);
  std::vector<std::size_t> count(partitions, 0);
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t p = partition_of<K>(key_at(i), partitions, key_groups);
    part[i] = p;
    ++count[p];
  }
  PartitionPlan plan;
  plan.bounds.resize(std::size_t{partitions} + 1);
  plan.bounds[0] = 0;
  for (std::uint32_t p = 0; p < partitions; ++p) plan.bounds[p + 1] = plan.bounds[p] + count[p];
  std::vector<std::size_t> next(plan.bounds.begin(), plan.bounds.end() - 1);
  plan.order.resize(n);
  for (std::size_t i = 0; i < n; ++i) plan.order[next[part[i]]++] = i;
  return plan;
}

// One partition's rows of a routed batch, owned and ready to fold: the keys, their table
// hashes (K::hash, computed once by routing: the fold reuses them instead of hashing again)
// and the value columns as rows of `width` float64 values, row-major (the block a fold
// takes). Bytes keys view `arena`, a vector so that moving the rows keeps the views valid;
// a copy would view the original's arena, so there is none (move-only).
template <class K>
struct RoutedRows {
  RoutedRows() = default;
  RoutedRows(RoutedRows&&) noexcept = default;
  RoutedRows& operator=(RoutedRows&&) noexcept = default;
  RoutedRows(const RoutedRows&) = delete;
  RoutedRows& operator=(const RoutedRows&) = delete;
  ~RoutedRows() = default;

  std::vector<char> arena;
  std::vector<typename K::View> keys;
  std::vector<std::uint64_t> hashes;
  std::vector<double> values;
  std::size_t width = 0;

  [[nodiscard]] std::size_t size() const noexcept { return keys.size(); }
};

// Splits n rows by partition in two passes: the first hashes every key (key_at(i) ->
// K::View) and counts each partition's rows and key bytes, the second appends each row to
// its partition (keys, hashes, and the float64 `columns[c][i]` side by side: width is
// columns.size(), at least 1). Stable: a partition's rows keep their batch order.
// `partitions` <= `key_groups`.
template <class K, class KeyAt>
[[nodiscard]] std::vector<RoutedRows<K>> route_rows(KeyAt&& key_at, std::size_t n,
                                                   std::uint32_t partitions,
                                                   std::uint32_t key_groups,
                                                   const std::vector<const double*>& columns) {
  std::vector<std::uint64_t> hashes(n);
  std::vector<std::uint32_t> part(n);
  std::vector<std::size_t> rows(partitions, 0);
  std::vector<std::size_t> bytes(partitions, 0);
  for (std::size_t i = 0; i < n; ++i) {
    const typename K::View key = key_at(i);
    const std::uint64_t h = K::hash(key);
    const std::uint32_t p = partition_of_hash(h, partitions, key_groups);
    hashes[i] = h;
    part[i] = p;
    ++rows[p];
    bytes[p] += K::arena_bytes(key);
  }
  const std::size_t width = columns.size();
  std::vector<RoutedRows<K>> out(partitions);
  for (std::uint32_t p = 0; p < partitions; ++p) {
    out[p].width = width;
    out[p].arena.reserve(bytes[p]);
    out[p].keys.reserve(rows[p]);
    out[p].hashes.reserve(rows[p]);
    out[p].values.reserve(rows[p] * width);
  }
  for (std::size_t i = 0; i < n; ++i) {
    RoutedRows<K>& r = out[part[i]];
    const typename K::View key = key_at(i);
    if constexpr (std::is_same_v<typename K::View, std::string_view>) {
      // Reserved above: appending never moves the arena, so earlier views stay valid.
      const std::size_t at = r.arena.size();
      r.arena.insert(r.arena.end(), key.begin(), key.end());
      r.keys.emplace_back(r.arena.data() + at, key.size());
    } else {
      r.keys.push_back(key);
    }
    r.hashes.push_back(hashes[i]);
    for (const double* column : columns) r.values.push_back(column[i]);
  }
  return out;
}

// Copies partition p's rows of a column of fixed-size items (`itemsize` bytes each, rows
// `stride` bytes apart) into `out`, contiguously.
void gather_rows(const PartitionPlan& plan, std::uint32_t p, const char* column,
                 std::ptrdiff_t stride, std::size_t itemsize, char* out) noexcept;

}  // namespace streamstate
