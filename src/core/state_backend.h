// The keyed state backend: an ordered, thread-safe in-memory map from byte keys to byte
// values with optional per-entry expiry, checkpointed into the project's record codec.
//
// Why this layout. Checkpoint and restore must run at memory speed, point operations must
// cost about as much as a Python dict lookup, and range scans must come from an ordered
// index. A node-per-entry tree fails the first (a cache miss per entry on every walk), a
// plain hash map fails the last. So:
//   * every entry is stored as exactly the bytes of its checkpoint record (lengths, flags,
//     optional expiry, key, value) in an arena of large chunks; a 16-byte slot points at it.
//     A checkpoint copies entries verbatim; a restore checks the container in one pass
//     (checksum a block ahead of the record walk) and indexes the records where they lie
//     (in place, when the caller can promise the bytes stay unchanged);
//   * the run: slots [0, run) sorted by key, their entries in key order after a merge, so a
//     checkpoint or a prefix scan is a sequential walk;
//   * the tail: keys inserted since the run was built, kept in key order by a small set of
//     slot ids; when it outgrows a fraction of the run (or dead entries and replaced values
//     pile up) everything is merged into a fresh run: amortised O(1) copies per write. A
//     bulk put_many leaves its new keys unordered until the next ordered read sorts them;
//   * a hash index (open addressing, 32-bit hash tags) over all slots for point operations,
//     probed with software prefetching in the batch calls, and built lazily after restore.
// Values of the same length are overwritten in place, so counters and fixed-width
// aggregates never grow the arena. Deletion marks the slot; compaction drops it.
//
// Time. An entry may carry an expiry timestamp (seconds, on whatever clock the caller
// uses; the Python layer defaults to time.time()). Every read takes `now` and treats
// entries with expires_at <= now as absent; checkpoint(now) leaves them out.
//
// Deltas. Every write marks its slot in a change bitmap (state_table.h says why a bitmap);
// checkpoint_delta(now) writes just the keys whose visible entry at `now` differs from the
// last capture (checkpoint, checkpoint_delta, restore or applied delta): their entries as
// they are now, or removals (delete, delete_prefix, compare_and_set to absent, purges, and
// entries that expired since the capture, exactly what checkpoint(now) would leave out).
// Each capture gives the backend an identity, the CRC32C of the container written or read;
// a delta names its parent's identity and checkpoint id, and apply_delta refuses any other
// base. restore(full) then apply_delta(d1) ... apply_delta(dn) gives the state as of dn.
//
// Concurrency. One std::shared_mutex: readers shared, writers exclusive. No method calls
// out to user code while holding it, except checkpoint's allocate callback, documented below.
// Captures (checkpoint, checkpoint_delta) run under the shared lock, so reads go on while
// they write, and reset the change tracking there: a second mutex serialises captures, and
// writers, which hold the lock exclusively, never meet one.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace streamstate {

namespace state_detail {
class StateTable;
}  // namespace state_detail

// An expiry that never comes.
inline constexpr double kNeverExpires = std::numeric_limits<double>::infinity();

// Seconds since the Unix epoch from the system clock (the same timeline as time.time()).
[[nodiscard]] double wall_clock_seconds() noexcept;

// Lets an embedding give up its own interpreter lock while a thread waits for the backend's
// lock (the Python bindings drop the GIL), so a waiting reader never stalls threads that
// have nothing to do with this backend. Both are called on the waiting thread, in pairs.
struct LockWaitHooks {
  void (*before_wait)() noexcept = nullptr;
  void (*after_wait)() noexcept = nullptr;
};

struct StateBackendOptions {
  // Keys tolerated outside the sorted run (the tail) before they are merged into it,
  // however small the run is. The tail may also grow to 1/8 of the run. Small values
  // exercise the merge paths in tests. (Python still accepts its old name, delta_limit.)
  std::size_t unsorted_tail_limit = 4096;
  LockWaitHooks hooks{};
};

// Entries copied out under the lock: bytes holds key0 value0 key1 value1 ... back to back.
struct EntryBatch {
  std::string bytes;
  std::vector<std::uint32_t> key_sizes;
  std::vector<std::uint32_t> value_sizes;
  [[nodiscard]] std::size_t size() const noexcept { return key_sizes.size(); }
};

// Values copied out under the lock, in request order; kMissing marks absent keys.
struct ValueBatch {
  static constexpr std::uint64_t kMissing = std::numeric_limits<std::uint64_t>::max();
  std::string bytes;
  std::vector<std::uint64_t> sizes;
};

// The largest key and value an entry can hold (a slot keeps a flag in the key length's top
// bit; the value's record carries a 9-byte expiry header in front of the value).
inline constexpr std::size_t kMaxStateKeySize = std::numeric_limits<std::int32_t>::max();
inline constexpr std::size_t kMaxStateValueSize = std::numeric_limits<std::uint32_t>::max() - 9;

class InMemoryStateBackend {
 public:
  explicit InMemoryStateBackend(StateBackendOptions options = {});
  ~InMemoryStateBackend();
  InMemoryStateBackend(const InMemoryStateBackend&) = delete;
  InMemoryStateBackend& operator=(const InMemoryStateBackend&) = delete;
  InMemoryStateBackend(InMemoryStateBackend&&) = delete;
  InMemoryStateBackend& operator=(InMemoryStateBackend&&) = delete;

  // Point operations. `now` hides entries that expired at or before it; `expires_at` is a
  // timestamp or kNeverExpires. Invalid times (NaN, -inf) and oversized keys or values throw
  // InvalidArgument before anything changes.
  [[nodiscard]] std::optional<std::string> get(std::string_view key, double now) const;
  void put(std::string_view key, std::string_view value, double expires_at = kNeverExpires);
  // True when a visible entry was removed (an expired one is removed silently).
  bool erase(std::string_view key, double now);
  // Atomically: if the visible value equals `expected` (nullopt: absent), store `desired`
  // (nullopt: delete) and return true; otherwise change nothing and return false.
  bool compare_and_set(std::string_view key, std::optional<std::string_view> expected,
                       std::optional<std::string_view> desired, double expires_at, double now);

  // Batches: one lock acquisition each, hash probes pipelined with prefetches. put_many
  // applies pairs in order (the last of duplicate keys wins); sizes must match.
  void put_many(std::span<const std::string_view> keys, std::span<const std::string_view> values,
                double expires_at = kNeverExpires);
  [[nodiscard]] ValueBatch get_many(std::span<const std::string_view> keys, double now) const;
  // The same into `out` (cleared first; callers may reuse its buffers across calls).
  void get_many(std::span<const std::string_view> keys, double now, ValueBatch& out) const;
  std::size_t erase_many(std::span<const std::string_view> keys, double now);

  // Visible entries whose key starts with `prefix`, sorted by key (unsigned bytewise).
  [[nodiscard]] EntryBatch range_scan(std::string_view prefix, double now) const;
  // The same, handing each entry to `visit` under the read lock (no copy). `visit` may throw
  // (the scan stops) but must not call back into this backend.
  void range_scan(std::string_view prefix, double now,
                  const std::function<void(std::string_view, std::string_view)>& visit) const;
  // Removes every entry under `prefix`; returns how many of them were visible.
  std::size_t erase_prefix(std::string_view prefix, double now);
  // Drops entries that expired at or before `now`; returns how many.
  std::size_t purge_expired(double now);

  // Writes a record-codec container (kind kStateBackend): a header record carrying
  // `checkpoint_id`, then every entry visible at `now` in key order. Under the read lock,
  // calls allocate(n) exactly once and then fills exactly n bytes at the returned address;
  // `allocate` must not call back into this backend. Returns n. Resets the change tracking.
  std::size_t checkpoint(std::uint64_t checkpoint_id, double now,
                         const std::function<char*(std::size_t)>& allocate);
  [[nodiscard]] std::string checkpoint(std::uint64_t checkpoint_id, double now);
  // The changes since the last capture as of `now` (kind kStateBackendDelta), tagged
  // `checkpoint_id`: O(changed entries) bytes, plus a pass over the slot bitmap and, when
  // entries carry expiry times, over those. Resets the change tracking.
  [[nodiscard]] std::string checkpoint_delta(std::uint64_t checkpoint_id, double now);
  // Validates the whole delta (container, header, every record) and that this backend is
  // in the state it was taken from (its parent's identity, no write since), then applies
  // all of it; on any error (CorruptDataError) the backend is untouched. Returns the
  // delta's checkpoint id.
  std::uint64_t apply_delta(std::string_view delta);
  // Validates the whole snapshot into a fresh table, then swaps it in; on any error
  // (CorruptDataError) the backend is untouched. Returns the snapshot's checkpoint id.
  // With `keep_alive`, the backend uses the snapshot's bytes in place instead of copying
  // them, holding keep_alive for as long as it does (until the next compaction or restore):
  // the bytes must not change meanwhile. keep_alive is never released under the lock.
  std::uint64_t restore(std::string_view snapshot, std::shared_ptr<const void> keep_alive = {});

  // Stored entries and the sum of their key and value sizes; entries that have expired
  // but were not yet purged still count (they still occupy memory).
  [[nodiscard]] std::size_t size() const;
  [[nodiscard]] std::size_t size_bytes() const;
  // Bumped by every call that changes stored state.
  [[nodiscard]] std::uint64_t version() const noexcept {
    return version_.load(std::memory_order_acquire);
  }

 private:
  using Table = state_detail::StateTable;  // the data; defined in state_table.h
  class WriteGuard;  // the exclusive lock; releases retired buffers after unlocking

  [[nodiscard]] std::shared_lock<std::shared_mutex> read_lock() const;
  [[nodiscard]] WriteGuard write_lock() const;
  // A read lock on a table whose deferred work is done: the hash index (a restored table
  // builds it on first use) and/or the ordering (a bulk put_many sorts on first use).
  [[nodiscard]] std::shared_lock<std::shared_mutex> prepared_read_lock(bool need_index,
                                                                       bool need_order) const;
  [[nodiscard]] WriteGuard indexed_write_lock();
  void bump_version() noexcept { version_.fetch_add(1, std::memory_order_acq_rel); }
  [[nodiscard]] std::unique_lock<std::mutex> capture_lock();
  // A capture or restore of the container `data` (checkpoint id, deltas since the last
  // full one, its `now`); resets the change tracking. Exclusive lock, or shared lock and
  // capture lock, held.
  void captured(std::string_view data, std::uint64_t checkpoint_id, std::uint64_t sequence,
                double captured_at) noexcept;

  StateBackendOptions options_;
  std::unique_ptr<Table> table_;
  mutable std::shared_mutex mutex_;
  std::atomic<std::uint64_t> version_{0};
  // The last capture (guarded as `captured` says): what the next delta names as its parent.
  std::mutex capture_mutex_;
  std::uint32_t identity_ = 0;  // CRC32C of its container; 0 for a fresh backend
  std::uint64_t checkpoint_id_ = 0;
  std::uint64_t sequence_ = 0;  // deltas since the last full checkpoint or restore
  double captured_at_ = -kNeverExpires;  // its `now`; -inf when unknown (after a restore)
};

}  // namespace streamstate
