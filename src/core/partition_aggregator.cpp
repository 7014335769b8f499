#include "core/partition_aggregator.h"

#include <bit>
#include <cmath>
#include <string>

#include "core/errors.h"

namespace streamstate {
namespace {

// Rows looked ahead: the slot of row i + kAhead is prefetched, and the entry of row
// i + kAhead / 2 (whose slot should be cached by then). At ~1M keys every lookup would
// otherwise be two dependent cache misses; this keeps ~16 of them in flight.
constexpr std::size_t kAhead = 16;
constexpr std::size_t kRing = 32;  // power of two > kAhead: hashes computed ahead, reused
static_assert(kRing > kAhead && (kRing & (kRing - 1)) == 0);

}  // namespace

bool any_nan(const double* values, std::size_t n) noexcept {
  // Branch-free OR of "x != x" over blocks so the compiler can vectorise it, with an
  // early exit per block.
  constexpr std::size_t kBlock = 256;
  for (std::size_t start = 0; start < n; start += kBlock) {
    const std::size_t end = start + kBlock < n ? start + kBlock : n;
    int found = 0;
    for (std::size_t i = start; i < end; ++i) found |= (values[i] != values[i]) ? 1 : 0;
    if (found != 0) return true;
  }
  return false;
}

template <class K>
std::size_t PartitionAggregator<K>::pending() const noexcept {
  std::size_t n = table_.size() - watermark_;
  for (const std::uint64_t w : changed_) n += static_cast<std::size_t>(std::popcount(w));
  return n;
}

template <class K>
void PartitionAggregator<K>::fold(const View* keys, const double* values, std::size_t n,
                                  NanPolicy policy) {
  if (n == 0) return;
  if (!any_nan(values, n)) {
    fold_numbers<false>(keys, values, n);
    return;
  }
  switch (policy) {
    case NanPolicy::kRaise:
      for (std::size_t i = 0; i < n; ++i) {
        if (std::isnan(values[i])) {
          throw InvalidArgument("NaN value at row " + std::to_string(i) +
                                " (nan_policy='raise'); nothing from this batch was folded");
        }
      }
      break;
    case NanPolicy::kSkip:
      fold_numbers<true>(keys, values, n);
      break;
    case NanPolicy::kPropagate:
      fold_with_nan(keys, values, n);
      break;
  }
}

template <class K>
template <bool kSkipNan>
void PartitionAggregator<K>::fold_numbers(const View* keys, const double* values,
                                          std::size_t n) {
  std::uint64_t ring[kRing];
  const std::size_t warm = n < kAhead ? n : kAhead;
  for (std::size_t j = 0; j < warm; ++j) {
    ring[j] = K::hash(keys[j]);
    table_.prefetch_slot(ring[j]);
  }
  const std::size_t watermark = watermark_;
  std::uint64_t* changed = changed_.data();
  for (std::size_t i = 0; i < n; ++i) {
    if (i + kAhead < n) {
      const std::uint64_t h = K::hash(keys[i + kAhead]);
      ring[(i + kAhead) & (kRing - 1)] = h;
      table_.prefetch_slot(h);
    }
    if (i + kAhead / 2 < n) table_.prefetch_entry(ring[(i + kAhead / 2) & (kRing - 1)]);
    const double x = values[i];
    if constexpr (kSkipNan) {
      if (std::isnan(x)) continue;
    }
    const std::size_t idx = table_.emplace(keys[i], ring[i & (kRing - 1)]).first;
    add_number(table_.value_at(idx), x);
    if (idx < watermark) changed[idx >> 6] |= std::uint64_t{1} << (idx & 63);
  }
}

template <class K>
void PartitionAggregator<K>::fold_with_nan(const View* keys, const double* values,
                                           std::size_t n) {
  // Only batches that contain NaN under kPropagate come here; no prefetching needed for
  // correctness, and this path is not the one tuned for speed.
  const std::size_t watermark = watermark_;
  for (std::size_t i = 0; i < n; ++i) {
    const std::size_t idx = table_.emplace(keys[i]).first;
    table_.value_at(idx).add(values[i]);
    if (idx < watermark) changed_[idx >> 6] |= std::uint64_t{1} << (idx & 63);
  }
}

template class PartitionAggregator<Int64Keys>;
template class PartitionAggregator<BytesKeys>;

}  // namespace streamstate
