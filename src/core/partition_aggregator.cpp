#include "core/partition_aggregator.h"

#include <bit>
#include <cmath>
#include <algorithm>
#include <stdexcept>
#include <limits>
#include <new>
#include <string>

#include "core/errors.h"

namespace streamstate {

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

// Shard-at-a-time folding pays off once the table outgrows the core's cache; below that
// the extra scatter pass costs more than it saves (measured crossover ~350-500K keys).
constexpr std::size_t kScatterMinKeys = std::size_t{3} << 17;
// Rows scattered at once: bounds the scratch memory (17 bytes a row for int64 keys, 25
// for bytes: ~70 / 100 MB) while keeping enough rows per shard for its table to be reused
// from cache (at 1M keys: 2M-row chunks fold 10M rows in ~0.37 s, 4M in ~0.34 s, 8M in
// ~0.30 s on the development machine).
constexpr std::size_t kScatterMaxRows = std::size_t{1} << 22;
// Staged rows folded at once, at most. A settle runs inside one fold call with no look at
// pending signals, so it is kept to about what the bindings fold between two such looks
// (1 << 19 rows): with the staging limit at the table size, a settle at 10M keys folded
// 4M rows in one go and Ctrl-C took up to ~1 s to land. The micro-batches' gain comes from
// folding 4K-row batches scattered, ~4K rows a shard, which this still gives.
constexpr std::size_t kStageMaxRows = std::size_t{1} << 19;
// Shards whose slots hold at least this many entries grow early, each at its own load.
// Keys spread evenly over the shards, so the shards fill alike and would all double in
// one call: on the way to 10M keys, one 512K-row chunk grew a partition's memory by
// 344 MB and took 2.3 s (a chunk that grows nothing: ~0.05 s), and Ctrl-C could not land
// meanwhile. Shard s instead grows (slots doubled, room reserved for all the entries they
// then hold) once it is (1/2 + s / (2 * kShards)) full, so the growth of one doubling is
// spread over the whole doubling. Below this size all shards growing together is cheap.
constexpr std::size_t kStaggerMinLoad = std::size_t{3} << 13;
// Row-by-row slices between checks of the table size, so one big batch that grows the
// table switches to scattering part way through.
constexpr std::size_t kRowSlice = std::size_t{1} << 16;

// Hashes from row `offset` on, or none when the fold hashes the keys itself.
const std::uint64_t* at(const std::uint64_t* hashes, std::size_t offset) noexcept {
  return hashes == nullptr ? nullptr : hashes + offset;
}

// A drained shard up to this size keeps its memory: per-batch publishes of a hot set then
// refill the same tables without regrowing them, while a shard that held a big load (a
// first load of 1M keys) frees it, since those partials now live in the shared map.
constexpr std::size_t kKeepDrainedEntries = 1024;

template <class K>
std::size_t PartitionAggregator<K>::changed() const noexcept {
  std::size_t n = 0;
  for (const Shard& sh : shards_) {
    n += sh.table.size() - sh.watermark;
    for (const std::uint64_t w : sh.changed) n += static_cast<std::size_t>(std::popcount(w));
  }
  return n;
}

template <class K>
std::size_t PartitionAggregator<K>::size() const noexcept {
  std::size_t n = 0;
  for (const Shard& sh : shards_) n += sh.table.size();
  return n;
}

template <class K>
std::size_t PartitionAggregator<K>::memory_bytes() const noexcept {
  std::size_t n = shards_.capacity() * sizeof(Shard) +
                  staged_keys_.capacity() * sizeof(View) + staged_values_.capacity() * sizeof(double);
  for (const Shard& sh : shards_) {
    n += sh.table.memory_bytes() - sizeof(sh.table) + sh.changed.capacity() * sizeof(std::uint64_t) +
         sh.more.capacity() * sizeof(Moments);
  }
  return n;
}

template <class K>
void PartitionAggregator<K>::collect_all(std::vector<std::uint64_t>& out) const {
  out.reserve(out.size() + size());
  for (std::size_t s = 0; s < kShards; ++s) {
    const std::uint64_t base = static_cast<std::uint64_t>(s) << kIndexBits;
    for (std::size_t i = 0; i < shards_[s].table.size(); ++i) out.push_back(base | i);
  }
}

template <class K>
void PartitionAggregator<K>::collect_changes(std::vector<std::uint64_t>& out) const {
  out.reserve(out.size() + changed());
  for (std::size_t s = 0; s < kShards; ++s) {
    const Shard& sh = shards_[s];
    const std::uint64_t base = static_cast<std::uint64_t>(s) << kIndexBits;
    for (std::size_t w = 0; w < sh.changed.size(); ++w) {
      for (std::uint64_t bits = sh.changed[w]; bits != 0; bits &= bits - 1) {
        out.push_back(base | (w * 64 + static_cast<std::uint64_t>(std::countr_zero(bits))));
      }
    }
    for (std::size_t i = sh.watermark; i < sh.table.size(); ++i) out.push_back(base | i);
  }
}

template <class K>
void PartitionAggregator<K>::forget_changes() noexcept {
  for (Shard& sh : shards_) {
    sh.watermark = sh.table.size();
    // The bitmap only ever covers entries below the watermark; zeroing in place keeps its
    // memory (a capture must not allocate after the point of no return).
    const std::size_t words = (sh.watermark + 63) / 64;
    if (sh.changed.capacity() >= words) {
      sh.changed.resize(words);
      std::fill(sh.changed.begin(), sh.changed.end(), std::uint64_t{0});
    } else {
      sh.changed.clear();
      sh.watermark = 0;  // no room for the bitmap: count every entry as changed instead
      try {
        sh.changed.assign(words, 0);
        sh.watermark = sh.table.size();
      } catch (...) {
        // Allocation failed: the entries stay "new", so the next delta repeats them.
      }
    }
  }
  drained_ = false;
}

template <class K>
void PartitionAggregator<K>::drain() noexcept {
  for (Shard& sh : shards_) {
    if (sh.table.size() <= kKeepDrainedEntries) {
      sh.table.clear();
      sh.more.clear();
    } else {
      sh.table.release();
      std::vector<std::uint64_t>().swap(sh.changed);
      std::vector<Moments>().swap(sh.more);
    }
    sh.changed.clear();
    sh.watermark = 0;
  }
  // Settled before every drain; the tables now start small, and staging waits until they
  // are big again, so its memory goes back too.
  std::vector<View>().swap(staged_keys_);
  std::vector<double>().swap(staged_values_);
  drained_ = true;
}

template <class K>
void PartitionAggregator<K>::replace(std::vector<Table>&& tables,
                                     std::vector<std::vector<Moments>>&& more) noexcept {
  for (std::size_t s = 0; s < kShards; ++s) {
    shards_[s].table = std::move(tables[s]);
    if (width_ > 1) {
      shards_[s].more = std::move(more[s]);
    } else {
      shards_[s].more.clear();
    }
    shards_[s].changed.clear();
    shards_[s].watermark = 0;
  }
  staged_keys_.clear();  // rows of the state being replaced
  staged_values_.clear();
  forget_changes();
}

template <class K>
void PartitionAggregator<K>::assign(View key, const Moments& first, const Moments* more) {
  const std::uint64_t h = K::hash(key);
  Shard& sh = shards_[shard_of(h)];
  if (width_ == 1) {
    sh.table.value_at(emplace_in(sh, key, h)) = first;
    return;
  }
  const std::size_t idx = emplace_wide(sh, key, h);
  sh.table.value_at(idx) = first;
  std::copy(more, more + (width_ - 1), sh.more.begin() + static_cast<std::ptrdiff_t>(idx * (width_ - 1)));
}

template <class K>
std::size_t PartitionAggregator<K>::emplace_wide(Shard& shard, View key, std::uint64_t hash) {
  const std::size_t w = width_ - 1;
  const std::size_t want = (shard.table.size() + 1) * w;
  if (shard.more.capacity() < want) shard.more.reserve(std::max(want, 2 * shard.more.capacity()));
  const std::size_t idx = emplace_in(shard, key, hash);
  // Reserved above: growing to cover a new entry cannot throw.
  if (shard.more.size() < (idx + 1) * w) shard.more.resize((idx + 1) * w);
  return idx;
}

template <class K>
std::size_t PartitionAggregator<K>::emplace_in(Shard& shard, View key, std::uint64_t hash) {
  if (shard.table.size() >= kMaxPerShard) [[unlikely]] {
    const std::size_t found = shard.table.find_index(key, hash);
    if (found == Table::npos) {
      throw std::length_error("partition aggregator: too many keys in one partition");
    }
    return found;
  }
  return shard.table.emplace(key, hash).first;
}

template <class K>
void PartitionAggregator<K>::fold(const View* keys, const double* values, std::size_t n,
                                  NanPolicy policy, const std::uint64_t* hashes) {
  if (n == 0) return;
  if (width_ > 1) {
    fold_wide(keys, hashes, values, n, policy);  // never stages (see fold())
    return;
  }
  const bool has_nan = any_nan(values, n);
  if (has_nan) {
    if (policy == NanPolicy::kRaise) {
      for (std::size_t i = 0; i < n; ++i) {
        if (std::isnan(values[i])) {
          throw InvalidArgument("NaN value at row " + std::to_string(i) +
                                " (nan_policy='raise'); nothing from this batch was folded");
        }
      }
    }
    if (policy == NanPolicy::kPropagate) {
      settle();
      fold_with_nan(keys, hashes, values, n);
      return;
    }
  }
  if constexpr (kStages) {
    // At most as many staged rows as entries (~16 B a key next to the table's ~64 B) and
    // kStageMaxRows: enough rows a shard for its table to be reused from cache.
    const std::size_t held = size();
    const std::size_t limit = std::min(held, kStageMaxRows);
    if (held >= kScatterMinKeys && n < limit) {
      if (has_nan) {
        stage<true>(keys, values, n, limit);  // kSkip: NaN rows are left out
      } else {
        stage<false>(keys, values, n, limit);
      }
      return;
    }
  }
  settle();  // the staged rows come first: each key's rows fold in arrival order
  if (has_nan) {
    fold_sliced<true>(keys, hashes, values, n);  // kSkip: NaN rows are left out
  } else {
    fold_sliced<false>(keys, hashes, values, n);
  }
}

template <class K>
template <bool kSkipNan>
void PartitionAggregator<K>::stage(const View* keys, const double* values, std::size_t n,
                                   std::size_t limit) {
  if (staged_keys_.size() + n > limit) settle();
  // Reserved before the first row goes in: a failed allocation stages nothing.
  staged_keys_.reserve(limit);
  staged_values_.reserve(limit);
  for (std::size_t i = 0; i < n; ++i) {
    if constexpr (kSkipNan) {
      if (std::isnan(values[i])) continue;
    }
    staged_keys_.push_back(keys[i]);
    staged_values_.push_back(values[i]);
  }
}

template <class K>
void PartitionAggregator<K>::settle() {
  if constexpr (kStages) {
    if (staged_keys_.empty()) return;
    // Taken out first: if folding fails part way (out of memory), the rows are not folded
    // twice by a later settle(). Handed back empty afterwards, keeping their memory.
    std::vector<View> keys;
    std::vector<double> values;
    keys.swap(staged_keys_);
    values.swap(staged_values_);
    fold_sliced<false>(keys.data(), nullptr, values.data(), keys.size());
    keys.clear();
    values.clear();
    staged_keys_.swap(keys);
    staged_values_.swap(values);
  }
}

template <class K>
template <bool kSkipNan>
void PartitionAggregator<K>::fold_sliced(const View* keys, const std::uint64_t* hashes,
                                          const double* values, std::size_t n) {
  std::size_t done = 0;
  while (done < n) {
    const std::size_t left = n - done;
    const bool big = size() >= kScatterMinKeys;
    if (big) stagger_growth();
    if (big && left >= kRowSlice) {
      const std::size_t chunk = left < kScatterMaxRows ? left : kScatterMaxRows;
      fold_scattered<kSkipNan>(keys + done, at(hashes, done), values + done, chunk);
      done += chunk;
    } else {
      const std::size_t chunk = left < kRowSlice ? left : kRowSlice;
      fold_rows<kSkipNan>(keys + done, at(hashes, done), values + done, chunk);
      done += chunk;
    }
  }
}

template <class K>
template <bool kSkipNan>
void PartitionAggregator<K>::fold_rows(const View* keys, const std::uint64_t* hashes,
                                        const double* values, std::size_t n) {
  prefetched_rows(keys, hashes, n, [&](std::size_t i, std::uint64_t h) {
    const double x = values[i];
    if constexpr (kSkipNan) {
      if (std::isnan(x)) return;
    }
    Shard& sh = shards_[shard_of(h)];
    const std::size_t idx = emplace_in(sh, keys[i], h);
    add_number(sh.table.value_at(idx), x);
    sh.mark(idx);
  });
}

template <class K>
template <bool kSkipNan>
void PartitionAggregator<K>::fold_scattered(const View* keys, const std::uint64_t* hashes,
                                             const double* values, std::size_t n) {
  // Pass 1: each row's shard (one byte a row) and the shard sizes.
  HugePageBuffer<std::uint8_t> shard_ids(n);
  std::size_t start[kShards + 1] = {};
  for (std::size_t i = 0; i < n; ++i) {
    if constexpr (kSkipNan) {
      if (std::isnan(values[i])) continue;
    }
    const auto s = static_cast<std::uint8_t>(shard_of(hash_of(keys, hashes, i)));
    shard_ids[i] = s;
    ++start[s + 1];
  }
  for (std::size_t s = 0; s < kShards; ++s) start[s + 1] += start[s];
  // Pass 2: scatter the rows into one contiguous run per shard (streaming writes).
  HugePageBuffer<Row> rows(start[kShards]);
  std::size_t at[kShards];
  std::copy(start, start + kShards, at);
  for (std::size_t i = 0; i < n; ++i) {
    if constexpr (kSkipNan) {
      if (std::isnan(values[i])) continue;
    }
    rows[at[shard_ids[i]]++] = Row{keys[i], values[i]};
  }
  // Pass 3: fold shard by shard; each shard's table is reused from cache. Slots are
  // prefetched kNear rows ahead and entries half way, as in prefetched_rows: with few rows
  // a shard (64K-row batches into 1M keys: ~500 rows into ~8K entries) the entries are
  // not cached yet, and the entry miss was the fold's largest cost (~25% of a 64K-batch
  // fold + publish + results at 1M keys).
  constexpr std::size_t kNear = kAhead;
  for (std::size_t s = 0; s < kShards; ++s) {
    Shard& sh = shards_[s];
    const Row* run = rows.data() + start[s];
    const std::size_t m = start[s + 1] - start[s];
    std::uint64_t ring[kRing];
    const std::size_t warm = m < kNear ? m : kNear;
    for (std::size_t j = 0; j < warm; ++j) {
      ring[j] = K::hash(run[j].key);
      sh.table.prefetch_slot(ring[j]);
    }
    for (std::size_t j = 0; j < m; ++j) {
      if (j + kNear < m) {
        const std::uint64_t h = K::hash(run[j + kNear].key);
        ring[(j + kNear) & (kRing - 1)] = h;
        sh.table.prefetch_slot(h);
      }
      if (j + kNear / 2 < m) sh.table.prefetch_entry(ring[(j + kNear / 2) & (kRing - 1)]);
      const std::size_t idx = emplace_in(sh, run[j].key, ring[j & (kRing - 1)]);
      add_number(sh.table.value_at(idx), run[j].value);
      sh.mark(idx);
    }
  }
}

template <class K>
void PartitionAggregator<K>::fold_with_nan(const View* keys, const std::uint64_t* hashes,
                                           const double* values, std::size_t n) {
  // Only batches that contain NaN under kPropagate come here: correctness first.
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint64_t h = hash_of(keys, hashes, i);
    Shard& sh = shards_[shard_of(h)];
    const std::size_t idx = emplace_in(sh, keys[i], h);
    sh.table.value_at(idx).add(values[i]);
    sh.mark(idx);
  }
}

template <class K>
void PartitionAggregator<K>::fold_wide(const View* keys, const std::uint64_t* hashes,
                                       const double* values, std::size_t n, NanPolicy policy) {
  const std::size_t w = width_;
  if (n > std::numeric_limits<std::size_t>::max() / w) {
    throw InvalidArgument("partition aggregator: batch too large");
  }
  const bool has_nan = any_nan(values, n * w);
  if (has_nan && policy == NanPolicy::kRaise) {
    for (std::size_t i = 0; i < n * w; ++i) {
      if (std::isnan(values[i])) {
        throw InvalidArgument("NaN value at row " + std::to_string(i / w) + ", column " +
                              std::to_string(i % w) +
                              " (nan_policy='raise'); nothing from this batch was folded");
      }
    }
  }
  const bool skip = has_nan && policy == NanPolicy::kSkip;
  // Row slices as fold_sliced cuts them: row by row while the table is small, scattered
  // by shard once it is big (the rows' values travel with their keys).
  std::size_t done = 0;
  while (done < n) {
    const std::size_t left = n - done;
    const bool big = size() >= kScatterMinKeys;
    if (big) stagger_growth();
    if (big && left >= kRowSlice) {
      const std::size_t chunk = std::min(left, kScatterMaxRows / w);
      fold_wide_scattered(keys + done, at(hashes, done), values + done * w, chunk, has_nan, skip);
      done += chunk;
    } else {
      const std::size_t chunk = std::min(left, kRowSlice);
      prefetched_rows(keys + done, at(hashes, done), chunk, [&](std::size_t i, std::uint64_t h) {
        const double* row = values + (done + i) * w;
        if (skip && all_nan(row)) return;
        fold_wide_row(shards_[shard_of(h)], keys[done + i], h, row, has_nan, skip);
      });
      done += chunk;
    }
  }
}

template <class K>
void PartitionAggregator<K>::stagger_growth() noexcept {
  for (std::size_t s = 0; s < kShards; ++s) {
    Shard& sh = shards_[s];
    const std::size_t load = sh.table.max_load();
    if (load < kStaggerMinLoad) continue;
    // What fills first, the slots or the entries' capacity, would grow by itself when full.
    const std::size_t room = std::min(load, sh.table.capacity());
    const std::size_t size = sh.table.size();
    if (size == 0 || size < room / 2 + room / 2 * s / kShards) continue;
    // Entries (and their columns, and pro rata the key arena) are reserved up to the slots'
    // load, slots doubled once the entries may reach it: then nothing of this shard grows
    // when full, only here, at its own fraction.
    const std::size_t entries = room < load ? std::min(2 * room, load) : 2 * load;
    // Growing early is optional: without the memory, the shard grows when it is full (and
    // that insert reports the failure).
    try {
      if (width_ > 1) sh.more.reserve(entries * (width_ - 1));
      sh.table.reserve(entries, (sh.table.key_bytes() + size - 1) / size * entries);
    } catch (const std::bad_alloc&) {
    } catch (const std::length_error&) {
    }
  }
}

template <class K>
bool PartitionAggregator<K>::all_nan(const double* row) const noexcept {
  std::size_t present = 0;
  for (std::size_t c = 0; c < width_; ++c) present += std::isnan(row[c]) ? 0 : 1;
  return present == 0;
}

template <class K>
void PartitionAggregator<K>::fold_wide_row(Shard& sh, View key, std::uint64_t hash,
                                           const double* row, bool has_nan, bool skip) {
  // A NaN is left out (kSkip) or poisons its column's partial (kPropagate).
  const auto add = [has_nan, skip](Moments& m, double x) noexcept {
    if (has_nan && std::isnan(x)) {
      if (!skip) m.add(x);
    } else {
      add_number(m, x);
    }
  };
  const std::size_t idx = emplace_wide(sh, key, hash);
  Moments* more = sh.more.data() + idx * (width_ - 1);
  add(sh.table.value_at(idx), row[0]);
  for (std::size_t c = 1; c < width_; ++c) add(more[c - 1], row[c]);
  sh.mark(idx);
}

template <class K>
void PartitionAggregator<K>::fold_wide_scattered(const View* keys, const std::uint64_t* hashes,
                                                 const double* values, std::size_t n,
                                                 bool has_nan, bool skip) {
  const std::size_t w = width_;
  // Pass 1: each row's shard and the shard sizes (all-NaN rows skipped are left out).
  HugePageBuffer<std::uint8_t> shard_ids(n);
  std::size_t start[kShards + 1] = {};
  for (std::size_t i = 0; i < n; ++i) {
    if (skip && all_nan(values + i * w)) continue;
    const auto s = static_cast<std::uint8_t>(shard_of(hash_of(keys, hashes, i)));
    shard_ids[i] = s;
    ++start[s + 1];
  }
  for (std::size_t s = 0; s < kShards; ++s) start[s + 1] += start[s];
  // Pass 2: keys and their rows of values into one contiguous run per shard.
  HugePageBuffer<View> run_keys(start[kShards]);
  HugePageBuffer<double> run_values(start[kShards] * w);
  std::size_t at[kShards];
  std::copy(start, start + kShards, at);
  for (std::size_t i = 0; i < n; ++i) {
    if (skip && all_nan(values + i * w)) continue;
    const std::size_t to = at[shard_ids[i]]++;
    run_keys[to] = keys[i];
    std::copy(values + i * w, values + (i + 1) * w, run_values.data() + to * w);
  }
  // Pass 3: fold shard by shard; each shard's table and columns are reused from cache.
  for (std::size_t s = 0; s < kShards; ++s) {
    Shard& sh = shards_[s];
    const View* run = run_keys.data() + start[s];
    const double* rows = run_values.data() + start[s] * w;
    const std::size_t m = start[s + 1] - start[s];
    // Slots prefetched kNear rows ahead, entries and their columns half way (as in
    // prefetched_rows, within the shard).
    constexpr std::size_t kNear = 8;
    std::uint64_t ring[kRing];
    for (std::size_t j = 0; j < std::min(m, kNear); ++j) {
      ring[j] = K::hash(run[j]);
      sh.table.prefetch_slot(ring[j]);
    }
    for (std::size_t j = 0; j < m; ++j) {
      if (j + kNear < m) {
        const std::uint64_t h = K::hash(run[j + kNear]);
        ring[(j + kNear) & (kRing - 1)] = h;
        sh.table.prefetch_slot(h);
      }
      if (j + kNear / 2 < m) sh.table.prefetch_entry(ring[(j + kNear / 2) & (kRing - 1)]);
      fold_wide_row(sh, run[j], ring[j & (kRing - 1)], rows + j * w, has_nan, skip);
    }
  }
}

template class PartitionAggregator<Int64Keys>;
template class PartitionAggregator<BytesKeys>;

}  // namespace streamstate
