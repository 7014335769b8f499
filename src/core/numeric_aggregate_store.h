// Typed numeric partials merged across partitions in C++: each partition folds locally
// (PartitionAggregator), publishes by merging what it folded since its last publish into
// its slot of one oneTBB concurrent_hash_map, and readers merge the per-partition partials
// of a key on demand. After a publish a key's partial lives in one place (the shared map);
// the partition's tables hold only what was folded since.
//
// Captures: snapshot() writes everything; snapshot_delta() only the slots and local
// entries changed since the previous capture (published slots are tracked by a dirty flag
// and a per-partition list of their nodes, local entries by the tables' change bitmaps).
// Every capture, restore and applied delta gives the store an identity (the container's
// CRC32C) and a sequence number (deltas since the last full snapshot); a delta names its
// parent's identity, so applying it anywhere else is refused.
//
// The shared map is keyed by group key and holds a short list of (partition, Moments)
// slots sorted by partition: a merged read of one key is one lookup, and result_columns()
// is one pass over the map, instead of num_partitions lookups per key.
//
// Key groups (partition_router.h): a store has key_groups() groups (fixed for a job,
// recorded in its snapshots) and num_partitions() <= key_groups(); partition p owns the
// groups key_group_range() gives it. Full snapshots are sectioned by group (an index
// record, then each group's records), so restore_from() rebuilds a store of any partition
// count from snapshots of any other, decoding only the sections its partitions own.
//
// Value columns: a store folds rows of width() values (one per named column, or one
// unnamed column, the default). Column 0 lives where the only column always lived (the
// table entry, the slot's partial), so one column costs what it did; columns 1.. sit
// side by side in arrays parallel to the entries and slots, reached by the same probe.
//
// Locking (always in this order, never while waiting for the GIL):
//   epoch_ (store-wide EpochLock): shared for publish and point reads, exclusive for
//     snapshot / restore / result_columns (which iterate the map);
//   each partition's mutex: held by fold and publish of that partition, and by snapshot /
//     restore for all partitions. Uncontended in a normal pipeline (one thread per
//     partition), it makes concurrent misuse of one partition safe instead of a data race.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <oneapi/tbb/concurrent_hash_map.h>

#include "core/aggregate_store.h"
#include "core/byte_io.h"
#include "core/record_codec.h"
#include "core/partition_aggregator.h"
#include "core/partition_router.h"
#include "core/stats.h"

namespace streamstate {

// count / sum / min / max / mean / var (ddof=1) / std per key: seven arrays allocated
// once for a known number of keys and filled by index, in parallel. (The spilling
// aggregator, which cannot know its count ahead, appends to GroupColumns instead.)
struct StatArrays {
  std::size_t size = 0;
  std::unique_ptr<std::int64_t[]> count;  // int64 as numpy / Arrow / pandas users expect
  std::unique_ptr<double[]> sum, min, max, mean, var, std;

  void allocate(std::size_t n) {
    size = n;
    count = std::make_unique_for_overwrite<std::int64_t[]>(n);
    for (auto* column : {&sum, &min, &max, &mean, &var, &std}) {
      *column = std::make_unique_for_overwrite<double[]>(n);
    }
  }
  void set(std::size_t i, const Moments& m) noexcept {
    count[i] = static_cast<std::int64_t>(m.count);
    sum[i] = m.sum;
    // A key none of whose values of this column counted (others did): no extremes.
    min[i] = m.count == 0 ? std::numeric_limits<double>::quiet_NaN() : m.min;
    max[i] = m.count == 0 ? std::numeric_limits<double>::quiet_NaN() : m.max;
    mean[i] = m.mean();
    var[i] = m.var();
    std[i] = std::sqrt(var[i]);
  }
};

template <class K>
class NumericAggregateStore {
 public:
  using View = typename K::View;
  using KeyColumn = typename K::KeyColumn;

  // Throws InvalidArgument unless 1 <= num_partitions <= key_groups <= 65536 (each
  // partition has its own table and owns at least one key group), or when `columns` (the
  // value columns' names; empty: one unnamed column) holds an empty or repeated name or
  // more than kMaxColumns.
  NumericAggregateStore(std::uint32_t num_partitions, NanPolicy policy,
                        std::vector<std::string> columns = {},
                        std::uint32_t key_groups = kDefaultKeyGroups);

  static constexpr std::size_t kMaxColumns = 4096;

  // The value columns' names (empty for the one unnamed column) and how many values a
  // row carries (>= 1).
  [[nodiscard]] const std::vector<std::string>& columns() const noexcept { return columns_; }
  [[nodiscard]] std::size_t width() const noexcept { return width_; }

  [[nodiscard]] std::uint32_t num_partitions() const noexcept {
    return static_cast<std::uint32_t>(partitions_.size());
  }
  [[nodiscard]] NanPolicy nan_policy() const noexcept { return policy_; }
  [[nodiscard]] std::uint32_t key_groups() const noexcept { return key_groups_; }

  // Single writer per partition by design; concurrent calls on one partition serialise.
  // `values` holds n rows of width() values, row-major; `hashes` (optional) the keys'
  // table hashes, K::hash(keys[i]), when routing computed them already.
  void fold(std::uint32_t partition_id, const View* keys, const double* values, std::size_t n,
            const std::uint64_t* hashes = nullptr);

  // Merges what the partition folded since its last publish into the shared map and
  // empties its tables, atomically with respect to captures. Returns how many partials
  // were pushed.
  std::size_t publish(std::uint32_t partition_id);

  // The key's partials of value column `column` merged in ascending partition order;
  // nullopt if nobody published the key.
  [[nodiscard]] std::optional<Moments> result(View key, std::size_t column = 0) const;

  // Every published key and its merged statistics, in no particular order, as finished
  // columns (what Python receives) written straight into buffers the caller can hand over
  // without copying: `columns` points at width() StatArrays, one per value column. Readers
  // run alone here, so the merge uses every core.
  void result_columns(KeyColumn& keys, StatArrays* columns) const;
  // The same for a one-column store.
  void result_columns(KeyColumn& keys, StatArrays& columns) const;

  // Published keys.
  [[nodiscard]] std::size_t size() const noexcept { return shared_.size(); }
  // Keys the partition holds: published by it or folded locally since.
  [[nodiscard]] std::size_t partition_size(std::uint32_t partition_id) const;
  // Local entries waiting for the next publish.
  [[nodiscard]] std::size_t partition_pending(std::uint32_t partition_id) const;
  // The partition's tables plus its slots in the shared map.
  [[nodiscard]] std::size_t partition_memory_bytes(std::uint32_t partition_id) const;

  // Shared map and every partition's local state (kind kNumericAggregateStore), sectioned
  // by key group; resets the change tracking. Equal contents give equal bytes.
  [[nodiscard]] std::string snapshot();
  // An export of the listed partitions (InvalidArgument for an id out of range; repeats
  // are ignored): every key one of them holds, with its partials of those partitions
  // (published slot and local entry of each, merged as repartitioned() merges), one merged
  // partial per key, sectioned by key group. Not a capture: the change tracking is left
  // alone, and only restore_from() / restore() read it (no delta follows it).
  [[nodiscard]] std::string snapshot_partitions(const std::vector<std::uint32_t>& partitions);
  // Validates everything into fresh structures, then swaps them in; CorruptDataError on
  // any problem (a snapshot of other value columns included) and the store is unchanged;
  // InvalidArgument for a snapshot of other key_groups. Also reads layout 1 (whose local
  // tables held full partials: they are published on restore), and exports (as
  // restore_from({data}) does: the store is then no capture's state).
  void restore(std::string_view data);
  // Replaces the state with the keys of `artifacts` (snapshots or exports of stores of
  // this key type, value columns and key_groups, at any partition count; older layouts
  // without key groups too) whose group a listed partition of this store owns (nullopt:
  // all partitions), each as one published partial at its owner: the merge of its
  // partials over every artifact (artifact by artifact, in order; within one, as
  // repartitioned() merges). Sections of groups no listed partition owns are skipped
  // without being decoded. All or nothing: every artifact is validated before anything
  // changes (CorruptDataError; InvalidArgument for other key_groups or a partition id
  // out of range). The store is then no capture's state (identity 0).
  void restore_from(const std::vector<std::string_view>& artifacts,
                    const std::optional<std::vector<std::uint32_t>>& partitions);

  // Restores from one snapshot per value column (parts[c] for column c), each written by
  // a store of one unnamed column with this store's key type: how a pipeline held its
  // value columns before one store held them all. Each part is validated as restore()
  // does, then the columns are joined key by key (a key missing from a column has an empty
  // partial there); CorruptDataError and the store is unchanged on any problem. The
  // result is no capture's state: the store's identity is that of a fresh store.
  void restore_columns(const std::vector<std::string_view>& parts);

  // The slots and local entries created or changed since the previous capture, in
  // O(changed) (kind kNumericAggregateStoreDelta); resets the change tracking.
  [[nodiscard]] std::string snapshot_delta();
  // Validates the whole delta (container, parent identity, every entry) before changing
  // anything; CorruptDataError and the store is unchanged. The store must be in the state
  // the delta was taken from (restored from its chain, nothing done since).
  void apply_delta(std::string_view data);

  // The current identity (CRC32C of the last capture, restore or applied delta; 0 for a
  // fresh store) and how many deltas follow the last full snapshot.
  [[nodiscard]] std::uint32_t identity() const noexcept { return identity_; }
  [[nodiscard]] std::uint64_t sequence() const noexcept { return sequence_; }

  // Rescaling: a new store of `partitions` partitions (same key type, nan policy, value
  // columns and key groups) holding this store's state with every key in one place: all of a key's
  // partials, published slots and local entries alike, merged into one published slot of
  // the partition partition_of<K> routes the key to. Per source partition, in ascending
  // order, the local entry is merged into the slot (what publish() does) and the results
  // into one partial (what result() does), so the new store's results equal this store's
  // after every partition published, bit for bit. This store is unchanged; consistent
  // while others publish (it locks as snapshot() does). The new store is a fresh one
  // (identity 0, nothing tracked): its first capture must be a full snapshot.
  // InvalidArgument unless 1 <= partitions <= 65536.
  [[nodiscard]] std::unique_ptr<NumericAggregateStore> repartitioned(
      std::uint32_t partitions) const;
  // The same into `target`, a store with this one's value columns and nan policy that
  // holds nothing yet (any number of partitions; InvalidArgument otherwise, `target`
  // unchanged); keys go to their owners under the target's key groups. Never holds both
  // stores' locks at once.
  void repartition_into(NumericAggregateStore& target) const;
  // The partitions holding a partial of the key (a published slot or a local entry),
  // ascending: after repartitioned(), exactly the key's owner.
  [[nodiscard]] std::vector<std::uint32_t> partitions_holding(View key) const;

  // Heap held by the partitions' tables plus an estimate for the shared map's nodes.
  [[nodiscard]] std::size_t memory_bytes() const;

 private:
  struct Slot {
    std::uint32_t partition;
    bool dirty;  // changed since the last capture (its node is in the partition's list)
    Moments partial;
  };

  // A key's partials, sorted by partition, at most one per partition. The first kInline
  // live inside the map node itself, so with a few partitions publishing costs no
  // allocation beyond TBB's node and a merged read touches one node.
  class Slots {
   public:
    static constexpr std::uint32_t kInline = 2;
    Slots() = default;
    Slots(const Slots&) = delete;
    Slots& operator=(const Slots&) = delete;
    Slots(Slots&&) = delete;
    Slots& operator=(Slots&&) = delete;
    ~Slots() = default;

    [[nodiscard]] const Slot* begin() const noexcept { return data(); }
    [[nodiscard]] const Slot* end() const noexcept { return data() + size_; }
    [[nodiscard]] std::uint32_t size() const noexcept { return size_; }
    [[nodiscard]] bool empty() const noexcept { return size_ == 0; }
    [[nodiscard]] std::size_t heap_bytes(std::size_t extra) const noexcept {
      return (heap_ ? capacity_ * sizeof(Slot) : 0) +
             (more_ ? capacity_ * extra * sizeof(Moments) : 0);
    }
    // The partition's slot, created empty (and clean) if absent; the bool tells which.
    // `extra` (width - 1, the same every call) Moments of columns 1.. go with each slot.
    std::pair<Slot*, bool> slot(std::uint32_t partition, std::size_t extra);
    [[nodiscard]] Slot* find(std::uint32_t partition) noexcept;
    // Columns 1.. of a slot of this list.
    [[nodiscard]] Moments* more(const Slot* s, std::size_t extra) noexcept {
      return more_.get() + static_cast<std::size_t>(s - data()) * extra;
    }
    [[nodiscard]] const Moments* more(const Slot* s, std::size_t extra) const noexcept {
      return more_.get() + static_cast<std::size_t>(s - data()) * extra;
    }

   private:
    [[nodiscard]] Slot* data() noexcept { return heap_ ? heap_.get() : inline_; }
    [[nodiscard]] const Slot* data() const noexcept { return heap_ ? heap_.get() : inline_; }

    std::uint32_t size_ = 0;
    std::uint32_t capacity_ = kInline;
    Slot inline_[kInline];
    std::unique_ptr<Slot[]> heap_;
    std::unique_ptr<Moments[]> more_;  // capacity_ * extra, parallel to the slots
  };

  struct KeyHash {
    using is_transparent = void;
    template <class A>
    [[nodiscard]] std::size_t hash(const A& k) const {
      return static_cast<std::size_t>(K::hash(View(k)));
    }
    template <class A, class B>
    [[nodiscard]] bool equal(const A& a, const B& b) const {
      return View(a) == View(b);
    }
  };
  using SharedMap = tbb::concurrent_hash_map<typename K::Key, Slots, KeyHash>;

  using Local = PartitionAggregator<K>;
  using Ref = typename Local::Ref;
  using Node = typename SharedMap::value_type;
  struct Partition {
    explicit Partition(std::size_t width) : local(width) {}
    mutable std::mutex mutex;
    // mutable: const readers settle() it (fold staged rows into its tables), which changes
    // how the partials are held, never what they are; always under `mutex`.
    mutable Local local;
    // Shared nodes whose slot of this partition is dirty, each once.
    std::vector<Node*> dirty;
    // Slots this partition holds in the shared map.
    std::size_t published = 0;
  };

  void check_partition(std::uint32_t partition_id) const;
  Partition& partition(std::uint32_t partition_id);
  const Partition& partition(std::uint32_t partition_id) const;
  // read(local) under the partition's mutex.
  template <class Read>
  auto read_local(std::uint32_t partition_id, Read&& read) const;
  // Grows the map's bucket array before a publish that would overflow it (see publish).
  void reserve_for(Partition& p);
  // The slots' partials of `column`, merged in ascending partition order.
  [[nodiscard]] Moments merged(const Slots& slots, std::size_t column) const noexcept;
  // Sets a slot's partials from column 0's and columns 1..'s.
  void put(Slots& slots, std::uint32_t partition, const Moments& first, const Moments* more) const;
  // Every key's partials held by the `listed` partitions (indexed by partition id; empty:
  // all), merged per source partition in ascending order (the local entry into the slot,
  // as publish() does, then across partitions, as result() does): reserve(upper bound on
  // the keys) once, then emit(key, width() merged Moments) per key holding any. Callers
  // hold this store's locks (Quiescent).
  template <class Reserve, class Emit>
  void merge_partials(const std::vector<char>& listed, Reserve&& reserve, Emit&& emit) const;
  // What a snapshot's header says (defined with the layouts, in the .cpp).
  struct Layout;
  // Reads and checks the header record (kind, key type, value columns, key groups) and
  // the section index of a snapshot of `bytes` bytes.
  [[nodiscard]] Layout read_layout(RecordReader& reader, std::size_t bytes) const;
  // Decodes a snapshot (layout 1 to 4) into `shared` and `local` (one per partition, `np`
  // of them: partition ids must be below it), only the sections of groups `wanted` marks
  // (empty: every section; older layouts have none and decode whole). Layout 1's local
  // tables become slots. CorruptDataError on any problem.
  template <class Staged>
  void decode_capture(RecordReader& reader, const Layout& layout, std::uint32_t np,
                      const std::vector<char>& wanted, SharedMap& shared,
                      std::vector<Staged>& local) const;
  // Decodes an export's wanted sections, handing each row to add(key, width() Moments).
  template <class Add>
  void decode_export(RecordReader& reader, const Layout& layout, const std::vector<char>& wanted,
                     Add&& add) const;
  // A "shared" chunk into `out` (partition ids below `np`; every key of group `group`
  // unless it is kAnyGroup); returns its entry count.
  std::size_t read_shared_chunk(ByteReader& in, std::uint32_t np, std::uint32_t group,
                                SharedMap& out) const;
  // Swaps in a state of published slots only (restore_from's): identity 0, nothing dirty.
  void install_published(SharedMap& fresh_shared);
  // Swaps in state a restore validated (a fresh map, and every partition's staged local
  // tables), with the map quiescent and every partition stopped; nothing is dirty after.
  template <class Staged>
  void install(SharedMap& fresh_shared, std::vector<Staged>& fresh_local);
  // Clears every dirty flag and list and every partition's change tracking, and takes the
  // capture's identity. Callers hold the exclusive epoch and every partition's lock.
  void reset_tracking(std::string_view capture, std::uint64_t sequence) noexcept;

  NanPolicy policy_;
  std::uint32_t key_groups_;
  std::vector<std::string> columns_;
  std::size_t width_;
  std::vector<std::unique_ptr<Partition>> partitions_;
  mutable EpochLock epoch_;
  mutable SharedMap shared_;
  std::uint32_t identity_ = 0;
  std::uint64_t sequence_ = 0;
};

extern template class NumericAggregateStore<Int64Keys>;
extern template class NumericAggregateStore<BytesKeys>;

}  // namespace streamstate
