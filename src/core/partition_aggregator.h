// The partition-local fold: one writer folds batches of (key, value) rows into per-key
// Moments in a flat hash table, with no locks and no allocation per row, and remembers
// which keys changed so a publish pushes only those.
//
// A row carries `width` values (one per value column, row-major). Column 0's Moments live
// in the table entry, exactly as with one column, so a one-column fold pays nothing for
// the others; columns 1.. of entry i live side by side in a dense array parallel to the
// entries ("more", at [i * (width - 1), (i + 1) * (width - 1))), found by the same probe.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "core/flat_table.h"
#include "core/key_traits.h"
#include "core/stats.h"

namespace streamstate {

// Adds a value known not to be NaN: Moments::add minus its NaN test. The min and max it
// computes anyway tell whether the value and the partial are ordinary (finite, below
// Moments::kHuge), which keeps the common case to two extra comparisons.
inline void add_number(Moments& m, double x) noexcept {
  const double lo = x < m.min ? x : m.min;
  const double hi = x > m.max ? x : m.max;
  if (lo > -Moments::kHuge && hi < Moments::kHuge) [[likely]] {
    m.add_ordinary(x, lo, hi);
  } else {
    m.add_extreme(x);
  }
}

// True when any of the n values is NaN (one vectorisable pass, cheap next to the fold).
[[nodiscard]] bool any_nan(const double* values, std::size_t n) noexcept;

// A partition's keys live in kShards flat tables chosen by the top bits of the key hash.
// Small batches go row by row (prefetching ahead). Big batches into big tables are first
// scattered by shard (one streaming pass), then folded shard by shard: each shard's table
// then stays in the core's cache while its rows go in, instead of every row missing
// memory twice. Measured at 1M keys: ~1.6x faster on one thread, and it keeps scaling on
// two threads where the row-by-row loop is bound by the core's outstanding-miss capacity.
template <class K>
class PartitionAggregator {
 public:
  using Keys = K;
  using View = typename K::View;
  using Table = FlatTable<K, Moments>;

  static constexpr unsigned kShardBits = 7;
  static constexpr std::size_t kShards = std::size_t{1} << kShardBits;
  // A Ref names an entry as (shard << kIndexBits) | index: 32 bits, so publish can sort
  // (bucket, Ref) pairs packed in one 64-bit word.
  using Ref = std::uint32_t;
  static constexpr unsigned kIndexBits = 32 - kShardBits;
  static constexpr std::size_t kMaxPerShard = (std::size_t{1} << kIndexBits) - 1;

  [[nodiscard]] static std::size_t shard_of(std::uint64_t hash) noexcept {
    return static_cast<std::size_t>(hash >> (64 - kShardBits));
  }

  // `width` values a row (>= 1).
  explicit PartitionAggregator(std::size_t width = 1) : shards_(kShards), width_(width) {}

  [[nodiscard]] std::size_t width() const noexcept { return width_; }

  // Folds n rows of width() values each (values row-major: n * width doubles). With
  // NanPolicy::kRaise a NaN anywhere in the batch throws InvalidArgument before any row is
  // folded; kSkip ignores NaN values, each column on its own (a row whose values are all
  // NaN is ignored entirely: the key is not created); kPropagate folds them (that column's
  // sum/mean/min/max/var become NaN). `hashes`, when given, holds K::hash(keys[i]) for
  // every row, computed already (routing hashes each key once and the fold reuses it);
  // nullptr: the fold hashes the keys itself. A wrong hash misplaces its key (it may then
  // appear twice) but never reaches outside the tables.
  //
  // Once the tables are big (where folding shard by shard pays), a one-column batch of keys
  // that own their value (int64) is staged rather than folded: micro-batches add up until
  // the staged rows number as many as the entries (at most kStageMaxRows, which keeps a
  // settle short: see the .cpp), and then fold shard by shard together,
  // so each shard's table is reused from cache instead of missing memory row by row (at
  // 1M keys, 4K-row batches fold ~1.16x faster; a 64K-row batch was scattered already).
  // Everything that reads the tables settle()s first; staging keeps each key's rows in
  // their order, so the partials are exactly those of folding at once. String views point
  // into the caller's batch and are folded at once.
  void fold(const View* keys, const double* values, std::size_t n, NanPolicy policy,
            const std::uint64_t* hashes = nullptr);
  // Folds the staged rows (a no-op when none are). Every reader of the tables calls it
  // first; the accessors below describe the tables as of the last settle().
  void settle();

  // What the tables hold is only what was folded since the last publish: publish merges
  // every entry into the shared map and then drain()s the tables, so a key's published
  // partial lives in one place. Change tracking is for captures (snapshot / delta): it
  // records what changed since the last forget_changes().

  // Appends the Refs of every entry (what a publish pushes).
  void collect_all(std::vector<std::uint64_t>& out) const;
  // Appends the Refs of entries changed since the last forget_changes().
  void collect_changes(std::vector<std::uint64_t>& out) const;
  // Marks everything as captured.
  void forget_changes() noexcept;
  // Empties the tables after a publish. Small shards keep their memory for the next
  // interval's keys; big ones give it back (a key's partial now lives in the shared map).
  void drain() noexcept;
  // True once drain() ran since the last forget_changes(): a delta must then tell the
  // reader to empty this partition's tables before applying its entries.
  [[nodiscard]] bool drained_since_capture() const noexcept { return drained_; }

  // Entries changed since the last forget_changes (new keys plus updated ones).
  [[nodiscard]] std::size_t changed() const noexcept;
  // Entries held (all waiting for the next publish).
  [[nodiscard]] std::size_t size() const noexcept;
  [[nodiscard]] std::size_t memory_bytes() const noexcept;

  [[nodiscard]] const Table& shard(std::size_t s) const noexcept { return shards_[s].table; }
  [[nodiscard]] View key_at(Ref r) const noexcept { return table_of(r).key_at(index_of(r)); }
  [[nodiscard]] const Moments& value_at(Ref r) const noexcept {
    return table_of(r).value_at(index_of(r));
  }
  // Columns 1 .. width()-1 of the entry (width() - 1 Moments; nullptr when width() is 1).
  [[nodiscard]] const Moments* more_at(Ref r) const noexcept {
    return more_of(shards_[r >> kIndexBits], index_of(r));
  }
  [[nodiscard]] const Moments* more_in(std::size_t s, std::size_t i) const noexcept {
    return more_of(shards_[s], i);
  }
  [[nodiscard]] std::uint64_t hash_at(Ref r) const noexcept {
    return table_of(r).hash_at(index_of(r));
  }
  void prefetch(Ref r) const noexcept { table_of(r).prefetch_index(index_of(r)); }

  // Replaces the contents (restore) with kShards tables whose keys each hash to their
  // shard, and (width() > 1) their entries' columns 1.. (`more`, kShards arrays laid out
  // as the shards'); nothing counts as changed afterwards.
  void replace(std::vector<Table>&& tables, std::vector<std::vector<Moments>>&& more) noexcept;
  // Sets the key's entry to `first` and columns 1.. to more[0 .. width()-1) (a delta being
  // applied; the caller checked the shard has room). Not tracked as a change.
  void assign(View key, const Moments& first, const Moments* more);
  [[nodiscard]] std::size_t shard_size(std::size_t s) const noexcept {
    return shards_[s].table.size();
  }

 private:
  struct Shard {
    Table table;
    // Entries [0, watermark) existed at the last capture; a set bit marks one changed
    // since. Entries from watermark on are new and implicitly changed.
    std::vector<std::uint64_t> changed;
    std::size_t watermark = 0;
    // Columns 1.. of every entry, width - 1 Moments each (empty for one column).
    std::vector<Moments> more;

    void mark(std::size_t idx) noexcept {
      if (idx < watermark) changed[idx >> 6] |= std::uint64_t{1} << (idx & 63);
    }
  };
  // A scattered row of the big-batch path.
  struct Row {
    View key;
    double value;
  };

  [[nodiscard]] static std::size_t index_of(Ref r) noexcept { return r & kMaxPerShard; }
  [[nodiscard]] const Table& table_of(Ref r) const noexcept {
    return shards_[r >> kIndexBits].table;
  }
  // Inserts or finds the key in its shard; enforces the per-shard entry limit.
  std::size_t emplace_in(Shard& shard, View key, std::uint64_t hash);
  // emplace_in for width() > 1: a new entry also gets its (empty) columns 1.., reserved
  // before the insert so a failed allocation leaves the shard consistent.
  std::size_t emplace_wide(Shard& shard, View key, std::uint64_t hash);
  [[nodiscard]] const Moments* more_of(const Shard& sh, std::size_t i) const noexcept {
    return width_ == 1 ? nullptr : sh.more.data() + i * (width_ - 1);
  }

  // The hash of row i: the caller's (`hashes`, when routing computed it) or computed here.
  [[nodiscard]] static std::uint64_t hash_of(const View* keys, const std::uint64_t* hashes,
                                             std::size_t i) noexcept {
    return hashes != nullptr ? hashes[i] : K::hash(keys[i]);
  }
  // Calls row(i, hash of keys[i]) for i in [0, n) in order, hashing each key once, kAhead
  // rows ahead, and prefetching its slot and then its entry so row()'s lookup hits cache.
  // Rows looked ahead: the slot of row i + kAhead is prefetched, and the entry of row
  // i + kAhead / 2 (whose slot should be cached by then). At ~1M keys every lookup would
  // otherwise be two dependent cache misses; this keeps ~16 of them in flight.
  static constexpr std::size_t kAhead = 16;
  static constexpr std::size_t kRing = 32;  // power of two > kAhead: hashes computed ahead
  static_assert(kRing > kAhead && (kRing & (kRing - 1)) == 0);
  template <class Row>
  [[gnu::always_inline]] void prefetched_rows(const View* keys, const std::uint64_t* hashes,
                                              std::size_t n, Row&& row) {
    std::uint64_t ring[kRing];
    const std::size_t warm = n < kAhead ? n : kAhead;
    for (std::size_t j = 0; j < warm; ++j) {
      ring[j] = hash_of(keys, hashes, j);
      shards_[shard_of(ring[j])].table.prefetch_slot(ring[j]);
    }
    for (std::size_t i = 0; i < n; ++i) {
      if (i + kAhead < n) {
        const std::uint64_t h = hash_of(keys, hashes, i + kAhead);
        ring[(i + kAhead) & (kRing - 1)] = h;
        shards_[shard_of(h)].table.prefetch_slot(h);
      }
      if (i + kAhead / 2 < n) {
        const std::uint64_t h = ring[(i + kAhead / 2) & (kRing - 1)];
        shards_[shard_of(h)].table.prefetch_entry(h);
      }
      row(i, ring[i & (kRing - 1)]);
    }
  }
  // Row by row while the table is small, shard by shard once it is big.
  template <bool kSkipNan>
  void fold_sliced(const View* keys, const std::uint64_t* hashes, const double* values,
                  std::size_t n);
  template <bool kSkipNan>
  void fold_rows(const View* keys, const std::uint64_t* hashes, const double* values,
                std::size_t n);
  template <bool kSkipNan>
  void fold_scattered(const View* keys, const std::uint64_t* hashes, const double* values,
                     std::size_t n);
  void fold_with_nan(const View* keys, const std::uint64_t* hashes, const double* values,
                     std::size_t n);
  // Rows of width() > 1 values: one hash and one probe a row, every column folded.
  void fold_wide(const View* keys, const std::uint64_t* hashes, const double* values,
                 std::size_t n, NanPolicy policy);
  // fold_scattered for rows of width() values.
  void fold_wide_scattered(const View* keys, const std::uint64_t* hashes, const double* values,
                           std::size_t n, bool has_nan, bool skip);
  // One row of width() values into the key's entry (NaN left out when `skip`).
  void fold_wide_row(Shard& sh, View key, std::uint64_t hash, const double* row, bool has_nan,
                     bool skip);
  [[nodiscard]] bool all_nan(const double* row) const noexcept;
  // Grows big shards ahead of need, each at its own load (see the .cpp): keys spread
  // evenly over the shards, so left alone every shard would double in the same call.
  void stagger_growth() noexcept;

  // Keys whose views own their value can wait in staged_keys_ after fold() returns.
  static constexpr bool kStages = std::is_arithmetic_v<View>;
  // Stages n rows (NaN values left out when kSkipNan), settling first if they do not fit
  // under `limit` staged rows.
  template <bool kSkipNan>
  void stage(const View* keys, const double* values, std::size_t n, std::size_t limit);

  std::vector<Shard> shards_;
  std::size_t width_;
  bool drained_ = false;
  // Rows fold() staged, in arrival order (see fold()).
  std::vector<View> staged_keys_;
  std::vector<double> staged_values_;
};

extern template class PartitionAggregator<Int64Keys>;
extern template class PartitionAggregator<BytesKeys>;

}  // namespace streamstate
