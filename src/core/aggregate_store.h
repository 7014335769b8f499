// The cross-partition store of opaque partial aggregates: each partition publishes a
// serialized partial under (group_key, partition_id); readers collect and merge them.
//
// Concurrency model. The entries live in a oneTBB concurrent_hash_map, so publishers on
// different threads only contend on the element they touch. TBB's map cannot be iterated
// safely while others insert, and a checkpoint must see each publish_many call whole, so a
// store-wide EpochLock separates the two kinds of operation: publish / publish_many /
// remove_group / point reads hold it shared (they run in parallel with each other), while
// snapshot / restore / groups hold it exclusively (they see a quiescent map). A
// publish_many that would grow the map by a lot first pre-sizes it (TBB's rehash()
// must also run alone), which spares the inserts TBB's bucket-by-bucket splitting.
//
// Captures. snapshot() writes everything; snapshot_delta() writes only the entries
// published or removed since the previous capture. An entry's first change since a
// capture sets its dirty flag and appends its key to a change log (one of kLogShards, by
// partition id, each with its own mutex: uncontended when each partition publishes from
// its own thread); a removal always appends. Each capture, restore and applied delta gives
// the store an identity (the container's CRC32C); a delta names its parent's.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <oneapi/tbb/concurrent_hash_map.h>
#include <oneapi/tbb/rw_mutex.h>

#include "core/hash.h"

namespace streamstate {

// The store-wide epoch lock: shared for publishers and point reads, exclusive for the
// operations that walk or resize the whole map. oneTBB's rw_mutex prefers the exclusive
// side (a waiting snapshot holds back new publishers; glibc's rwlock lets a steady stream
// of them starve it forever) and sleeps instead of spinning once a wait gets long. Its
// state is an atomic in this header, so ThreadSanitizer sees every acquire and release.
using EpochLock = tbb::rw_mutex;
using SharedEpoch = std::shared_lock<EpochLock>;
using ExclusiveEpoch = std::unique_lock<EpochLock>;

class AggregateStore {
 public:
  // Throws InvalidArgument unless 1 <= num_partitions <= 65536.
  explicit AggregateStore(std::uint32_t num_partitions);

  [[nodiscard]] std::uint32_t num_partitions() const noexcept { return num_partitions_; }
  // (group, partition) entries across the store.
  [[nodiscard]] std::size_t size() const noexcept { return entries_.size(); }
  [[nodiscard]] bool empty() const noexcept { return entries_.empty(); }

  // Overwrites the partition's previous partial for the group. InvalidArgument for a
  // partition id out of range.
  void publish(std::string_view group_key, std::uint32_t partition_id, std::string_view partial);

  // All pairs in one call, atomic with respect to snapshot(). Checks everything (partition
  // id, equal lengths) before publishing anything. A key repeated in one call: last wins.
  void publish_many(std::uint32_t partition_id, std::span<const std::string_view> group_keys,
                    std::span<const std::string_view> partials);

  [[nodiscard]] std::optional<std::string> get_partial(std::string_view group_key,
                                                       std::uint32_t partition_id) const;

  // (partition id, partial) for every partition that published the group, ascending id.
  // One point lookup per partition id.
  [[nodiscard]] std::vector<std::pair<std::uint32_t, std::string>> collect_partials(
      std::string_view group_key) const;

  // Drops every partition's partial for the group; returns how many were dropped.
  std::size_t remove_group(std::string_view group_key);

  // Every group with at least one partial, sorted bytewise (one pass over the entries).
  [[nodiscard]] std::vector<std::string> groups() const;

  // A record-codec container (kind kAggregateStore), entries sorted by (group, partition);
  // resets the change tracking.
  [[nodiscard]] std::string snapshot();

  // Replaces the whole contents with a snapshot's. Validates everything into a fresh map
  // first; on any problem throws CorruptDataError and the store is unchanged.
  void restore(std::string_view data);

  // The entries published or removed since the previous capture (kind
  // kAggregateStoreDelta), in O(changed); resets the change tracking.
  [[nodiscard]] std::string snapshot_delta();
  // Validates the whole delta (container, parent identity, every entry) first; on any
  // problem CorruptDataError and the store is unchanged. The store must be in the state the
  // delta was taken from (restored from its chain, nothing done since).
  void apply_delta(std::string_view data);

  // CRC32C of the last capture, restore or applied delta (0 for a fresh store), and how
  // many deltas follow the last full snapshot.
  [[nodiscard]] std::uint32_t identity() const noexcept { return identity_; }
  [[nodiscard]] std::uint64_t sequence() const noexcept { return sequence_; }

  // An estimate of the heap held (keys, partials, map nodes and buckets).
  [[nodiscard]] std::size_t memory_bytes() const;

  // Owned and borrowed forms of a (group, partition) key; the map looks up by the view.
  struct EntryKeyView {
    std::string_view group;
    std::uint32_t partition = 0;
  };
  struct EntryKey {
    std::string group;
    std::uint32_t partition = 0;
    explicit EntryKey(const EntryKeyView& v) : group(v.group), partition(v.partition) {}
  };

 private:
  // Hashes and compares owned keys and views alike, so lookups never allocate.
  struct EntryHash {
    using is_transparent = void;
    [[nodiscard]] static std::size_t hash_of(std::string_view group, std::uint32_t partition) {
      return static_cast<std::size_t>(hash_u64(hash_bytes(group), partition));
    }
    [[nodiscard]] std::size_t hash(const EntryKey& k) const { return hash_of(k.group, k.partition); }
    [[nodiscard]] std::size_t hash(const EntryKeyView& k) const {
      return hash_of(k.group, k.partition);
    }
    template <class A, class B>
    [[nodiscard]] bool equal(const A& a, const B& b) const {
      return a.partition == b.partition && std::string_view(a.group) == std::string_view(b.group);
    }
  };
  // Keyed by (group, partition) and nothing else: publishing is the hot path, so each
  // publish is exactly one map operation. A secondary group -> partitions index was tried
  // and dropped: it doubled the cost of every first publish of a key (a second node, key
  // copy and id list) to speed up collect_partials / groups, which are occasional reads
  // and already cheap enough as num_partitions point lookups / one sorted pass.
  struct Partial {
    std::string bytes;
    bool dirty = false;  // changed since the last capture (its key is in a change log)
  };
  using EntryMap = tbb::concurrent_hash_map<EntryKey, Partial, EntryHash>;
  static constexpr std::size_t kLogShards = 16;
  struct ChangeLog {
    std::mutex mutex;
    std::vector<EntryKey> keys;
  };

  void check_partition(std::uint32_t partition_id) const;
  // Pre-sizes the bucket array for `more` new entries if it would otherwise grow.
  void reserve_for(std::size_t more);
  // Publishes one pair; the caller holds the epoch lock shared. True when the entry is
  // newly dirty (its key must be logged).
  bool publish_locked(std::string_view group_key, std::uint32_t partition_id,
                      std::string_view partial);
  void log_change(EntryKeyView key);
  // Clears the dirty flags and logs and takes the capture's identity; the caller holds the
  // epoch lock exclusively.
  void reset_tracking(std::string_view capture, std::uint64_t sequence) noexcept;

  std::uint32_t num_partitions_;
  mutable EpochLock epoch_;
  mutable EntryMap entries_;
  std::vector<ChangeLog> logs_ = std::vector<ChangeLog>(kLogShards);
  std::uint32_t identity_ = 0;
  std::uint64_t sequence_ = 0;
};

}  // namespace streamstate
