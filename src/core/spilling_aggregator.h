// A group-by (count, sum, min, max, mean, var per key) that never gives up: grace hash
// aggregation with recursive repartitioning, so any input finishes within a memory limit.
//
// Layout. Keys are routed by hash to one of `lanes` independent aggregators (one per
// thread: a batch is folded by all lanes at once, each taking the rows whose keys it owns,
// so no locks and no shared writes). A lane owns `fanout` partitions, each a flat hash
// table of partial Moments selected by other bits of the hash. The memory limit is split
// evenly between the lanes, and each lane accounts the real bytes its tables and I/O
// buffers hold (flat_table's memory_bytes(), with growth charged before it happens).
//
// Spilling. Tables grow by doubling while the lane's budget allows. The first time it does
// not, the lane writes every partition to its spill file and re-reserves all partitions at
// one equal size that fills the budget; from then on a partition that fills is written out
// alone (a "run", or spilled batch: its partials appended to its file) and reused, so
// every run is a full table. Files hold partials, never raw rows: a key holding 90% of the rows is one record
// per run.
//
// Draining. A lane's partitions that never spilled are emitted straight from memory. Each
// spilled partition is read back into a fresh level of partitions keyed by different hash
// bits; if that level overflows too it spills and is drained in turn, recursively, so the
// peak stays within the budget however many files there are. A partition whose single key
// does not fit (a byte-string key larger than the budget) is the one case that exceeds it.
//
// Errors. I/O failures throw SpillIoError naming the path; damaged spill files throw
// CorruptDataError naming the file. Either one poisons the aggregator: the batch or drain
// that failed may have been partly applied, so every later call rethrows the same error
// and no partial result can be observed. close() frees memory and deletes the files.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/result_columns.h"
#include "core/stats.h"

namespace streamstate {

struct SpillingAggregatorOptions {
  // Working-memory limit in bytes; 0 means unlimited (never spill). At least 64 KiB.
  std::size_t mem_limit_bytes = 64 << 20;
  // An existing directory private to this aggregator; spill files are created inside it.
  std::string spill_dir;
  NanPolicy nan_policy = NanPolicy::kSkip;
  // Worker lanes (threads); 0 means one per core TBB may use (at most 16).
  unsigned threads = 0;
};

struct SpillDiagnostics {
  std::uint64_t spill_count = 0;          // times memory was spilled (one or all partitions)
  std::uint64_t spilled_batch_count = 0;  // runs written (one partition's partials each)
  std::uint64_t total_spilled_bytes = 0;  // bytes written to spill files
  std::uint64_t in_memory_groups = 0;     // groups held in memory (frozen by drain)
  std::uint64_t peak_memory_bytes = 0;    // highest accounted working memory
  std::uint64_t memory_bytes = 0;         // accounted working memory now
  std::uint64_t spill_depth = 0;          // deepest level that spilled, plus one (0: never)
  std::uint64_t spill_files = 0;          // spill files on disk now
};

// The smallest limit accepted (the fixed part of the tables and buffers must fit).
inline constexpr std::size_t kMinSpillMemLimit = 64 * 1024;

template <class Key>
class SpillingAggregator {
 public:
  explicit SpillingAggregator(SpillingAggregatorOptions options);
  ~SpillingAggregator();
  SpillingAggregator(const SpillingAggregator&) = delete;
  SpillingAggregator& operator=(const SpillingAggregator&) = delete;
  SpillingAggregator(SpillingAggregator&&) = delete;
  SpillingAggregator& operator=(SpillingAggregator&&) = delete;

  void accumulate(Key key, double value);
  // Folds n rows using every lane in parallel. With NanPolicy::kRaise a NaN anywhere
  // rejects the whole batch before any row is folded.
  void accumulate_batch(const Key* keys, const double* values, std::size_t n);

  // Merges everything (memory and spill files) into one result per key and deletes the
  // files. Terminal: afterwards accumulate/drain throw, diagnostics keep their values.
  // Returns one column set per lane, to be concatenated in order.
  [[nodiscard]] std::vector<GroupColumns> drain();

  // Frees memory and deletes spill files; idempotent, never throws.
  void close() noexcept;

  [[nodiscard]] SpillDiagnostics diagnostics() const;
  [[nodiscard]] unsigned lanes() const noexcept;
  [[nodiscard]] std::size_t fanout() const noexcept;
  [[nodiscard]] bool closed() const noexcept;

 private:
  struct Impl;
  void check_usable() const;
  // Records the exception in flight and frees everything (files included).
  void poison() noexcept;
  void release_impl() noexcept;
  [[nodiscard]] SpillDiagnostics snapshot_diagnostics() const noexcept;

  mutable std::mutex mutex_;  // one call at a time; TBB parallelism is inside a call
  std::unique_ptr<Impl> impl_;  // null once drained, closed or poisoned
  std::exception_ptr poison_;
  SpillDiagnostics final_{};  // what diagnostics() reports once impl_ is gone
  unsigned lanes_ = 1;
  std::size_t fanout_ = 0;
};

extern template class SpillingAggregator<std::int64_t>;
extern template class SpillingAggregator<std::string_view>;

using Int64SpillingAggregator = SpillingAggregator<std::int64_t>;
using BytesSpillingAggregator = SpillingAggregator<std::string_view>;

}  // namespace streamstate
