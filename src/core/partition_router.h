// Routing rows to partitions: the same key goes to the same partition in every process,
// run, version and machine, because the partition is a pure function of the key's bytes
// (or int64 value) through the core's seedless hash (hash.h, kStableSeed).
//
// A key's partition is fast_range(hash_u64(K::hash(key), kRoutingSeed), partitions): the
// table hash is re-mixed with a seed of its own before its high bits pick the partition.
// Taking bits of the table hash directly would correlate with the bits the tables use
// (low bits for a slot, top bits for a shard): with hash % 2, partition 0 would only ever
// fill even slots. The re-mix makes routing independent of both.
//
// Changing kRoutingSeed or this formula moves keys between partitions of restored jobs:
// the known-answer tests (C++ and Python) pin it.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "core/hash.h"
#include "core/key_traits.h"

namespace streamstate {

inline constexpr std::uint64_t kRoutingSeed = nth_seed(17);

// The partition in [0, partitions) of a key whose table hash is `hash`.
[[nodiscard]] inline std::uint32_t partition_of_hash(std::uint64_t hash,
                                                     std::uint32_t partitions) noexcept {
  __extension__ typedef unsigned __int128 u128;  // NOLINT: GCC/Clang extension
  const std::uint64_t fresh = hash_u64(hash, kRoutingSeed);
  return static_cast<std::uint32_t>((static_cast<u128>(fresh) * partitions) >> 64);
}

template <class K>
[[nodiscard]] std::uint32_t partition_of(typename K::View key, std::uint32_t partitions) noexcept {
  return partition_of_hash(K::hash(key), partitions);
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
template <class K, class KeyAt>
[[nodiscard]] PartitionPlan plan_partitions(KeyAt&& key_at, std::size_t n,
                                            std::uint32_t partitions) {
  std::vector<std::uint32_t> part(n);
  std::vector<std::size_t> count(partitions, 0);
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint32_t p = partition_of<K>(key_at(i), partitions);
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

// Copies partition p's rows of a column of fixed-size items (`itemsize` bytes each, rows
// `stride` bytes apart) into `out`, contiguously.
void gather_rows(const PartitionPlan& plan, std::uint32_t p, const char* column,
                 std::ptrdiff_t stride, std::size_t itemsize, char* out) noexcept;

}  // namespace streamstate
