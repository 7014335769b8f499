// Sorting ids by byte-string keys (unsigned bytewise) without chasing a pointer per
// comparison: the state backend orders a bulk load's new keys with it.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>
#include <utility>
#include <vector>

namespace streamstate {
namespace radix_detail {

// Keys visited ahead of the one being read: their first bytes are prefetched.
inline constexpr std::size_t kPrefetchDistance = 12;
// Groups at least this large are radix sorted; smaller ones go to std::sort.
inline constexpr std::size_t kRadixSortMin = 1024;

// Sorting keys without chasing a pointer per comparison: sort (8-byte big-endian chunk, id)
// pairs by chunk, then refine groups whose chunks tie on the next 8 bytes. Namespaced keys
// share long prefixes, so ties are the normal case, not an afterthought.
struct ChunkedId {
  std::uint64_t chunk;
  std::uint32_t id;
};

[[nodiscard]] inline std::uint64_t chunk_at(std::string_view key, std::size_t depth) noexcept {
  if (key.size() >= depth + 8) {
    std::uint64_t v;
    std::memcpy(&v, key.data() + depth, sizeof v);
    if constexpr (std::endian::native == std::endian::little) v = __builtin_bswap64(v);
    return v;
  }
  std::uint64_t chunk = 0;
  for (std::size_t i = depth; i < key.size(); ++i) {
    chunk |= static_cast<std::uint64_t>(static_cast<unsigned char>(key[i]))
             << (8 * (7 - (i - depth)));
  }
  return chunk;
}

// Stable LSD radix sort on the chunk, skipping byte positions where every item agrees
// (common prefixes cost nothing).
inline void radix_sort_chunks(ChunkedId* items, std::size_t n, std::vector<ChunkedId>& scratch) {
  std::array<std::array<std::size_t, 256>, 8> counts{};
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint64_t c = items[i].chunk;
    for (std::size_t b = 0; b < 8; ++b) ++counts[b][(c >> (8 * b)) & 0xff];
  }
  scratch.resize(n);
  ChunkedId* src = items;
  ChunkedId* dst = scratch.data();
  for (std::size_t b = 0; b < 8; ++b) {
    auto& count = counts[b];
    if (count[(items[0].chunk >> (8 * b)) & 0xff] == n) continue;
    std::size_t offset = 0;
    for (auto& c : count) offset += std::exchange(c, offset);
    for (std::size_t i = 0; i < n; ++i) dst[count[(src[i].chunk >> (8 * b)) & 0xff]++] = src[i];
    std::swap(src, dst);
  }
  if (src != items) std::copy(src, src + n, items);
}

// Sorts ids by key_of(id) (a string_view), unsigned bytewise: radix or std::sort on 8-byte
// chunks, then refinement of tied groups on the next chunk.
}  // namespace radix_detail

template <typename KeyOf>
void sort_ids_by_key(std::vector<std::uint32_t>& ids, KeyOf&& key_of) {
  using radix_detail::ChunkedId;
  using radix_detail::kPrefetchDistance;
  if (ids.size() < 2) return;
  std::vector<ChunkedId> items(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) items[i].id = ids[i];
  std::vector<ChunkedId> scratch;
  struct Range {
    std::size_t first;
    std::size_t last;
    std::size_t depth;
  };
  std::vector<Range> work{{0, items.size(), 0}};
  while (!work.empty()) {
    const Range r = work.back();
    work.pop_back();
    ChunkedId* first = items.data() + r.first;
    ChunkedId* last = items.data() + r.last;
    for (ChunkedId* p = first; p != last; ++p) {
      if (last - p > static_cast<std::ptrdiff_t>(kPrefetchDistance)) {
        __builtin_prefetch(key_of(p[kPrefetchDistance].id).data() + r.depth);
      }
      p->chunk = radix_detail::chunk_at(key_of(p->id), r.depth);
    }
    if (last - first >= static_cast<std::ptrdiff_t>(radix_detail::kRadixSortMin)) {
      radix_detail::radix_sort_chunks(first, static_cast<std::size_t>(last - first), scratch);
    } else {
      std::sort(first, last,
                [](const ChunkedId& a, const ChunkedId& b) { return a.chunk < b.chunk; });
    }
    for (ChunkedId* a = first; a != last;) {
      ChunkedId* b = a + 1;
      while (b != last && b->chunk == a->chunk) ++b;
      if (b - a > 1) {
        // Equal chunks: keys that end inside this chunk are prefixes of the longer ones,
        // and of each other, so they come first, shortest first.
        const std::size_t end = r.depth + 8;
        ChunkedId* mid = std::partition(
            a, b, [&](const ChunkedId& c) { return key_of(c.id).size() <= end; });
        std::sort(a, mid, [&](const ChunkedId& x, const ChunkedId& y) {
          return key_of(x.id).size() < key_of(y.id).size();
        });
        if (b - mid > 1) {
          work.push_back({static_cast<std::size_t>(mid - items.data()),
                          static_cast<std::size_t>(b - items.data()), end});
        }
      }
      a = b;
    }
  }
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = items[i].id;
}

}  // namespace streamstate
