#include "core/state_backend.h"

#include <chrono>
#include <cmath>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <utility>

#include "core/errors.h"
#include "core/record_codec.h"
#include "core/state_table.h"

namespace streamstate {
namespace {

using state_detail::kNoSlot;
using state_detail::state_key_hash;

void check_now(double now) {
  if (!std::isfinite(now)) throw InvalidArgument("state backend: `now` must be a finite timestamp");
}

void check_expiry(double expires_at) {
  if (std::isnan(expires_at) || expires_at == -kNeverExpires) {
    throw InvalidArgument("state backend: expires_at must be a timestamp or +inf (never)");
  }
}

void check_entry(std::string_view key, std::string_view value) {
  if (key.size() > kMaxStateKeySize) throw InvalidArgument("state backend: key exceeds 2 GiB");
  if (value.size() > kMaxStateValueSize) {
    throw InvalidArgument("state backend: value exceeds 4 GiB minus 9 bytes");
  }
}

class WaitScope {
 public:
  explicit WaitScope(const LockWaitHooks& hooks) noexcept : hooks_(hooks) {
    if (hooks_.before_wait != nullptr) hooks_.before_wait();
  }
  ~WaitScope() {
    if (hooks_.after_wait != nullptr) hooks_.after_wait();
  }
  WaitScope(const WaitScope&) = delete;
  WaitScope& operator=(const WaitScope&) = delete;
  WaitScope(WaitScope&&) = delete;
  WaitScope& operator=(WaitScope&&) = delete;

 private:
  const LockWaitHooks& hooks_;
};

}  // namespace

double wall_clock_seconds() noexcept {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// ---------------------------------------------------------------------------------------

// The exclusive lock, plus the rule that buffers a compaction retired (a restored snapshot
// owned by the embedding) are released only after unlocking.
class InMemoryStateBackend::WriteGuard {
 public:
  explicit WriteGuard(const InMemoryStateBackend& backend)
      : backend_(&backend), lock_(backend.mutex_, std::try_to_lock) {
    if (!lock_.owns_lock()) {
      const WaitScope wait(backend.options_.hooks);
      lock_.lock();
    }
  }
  WriteGuard(WriteGuard&& other) noexcept = default;
  WriteGuard& operator=(WriteGuard&&) = delete;
  WriteGuard(const WriteGuard&) = delete;
  WriteGuard& operator=(const WriteGuard&) = delete;
  ~WriteGuard() {
    if (!lock_.owns_lock()) return;
    const auto retired = backend_->table_->take_retired();
    lock_.unlock();
  }  // `retired` is released here, outside the lock

 private:
  const InMemoryStateBackend* backend_;
  std::unique_lock<std::shared_mutex> lock_;
};

InMemoryStateBackend::InMemoryStateBackend(StateBackendOptions options)
    : options_(options), table_(std::make_unique<Table>(options.unsorted_tail_limit)) {}

InMemoryStateBackend::~InMemoryStateBackend() = default;

std::shared_lock<std::shared_mutex> InMemoryStateBackend::read_lock() const {
  std::shared_lock lock(mutex_, std::try_to_lock);
  if (!lock.owns_lock()) {
    const WaitScope wait(options_.hooks);
    lock.lock();
  }
  return lock;
}

InMemoryStateBackend::WriteGuard InMemoryStateBackend::write_lock() const {
  return WriteGuard(*this);
}

std::shared_lock<std::shared_mutex> InMemoryStateBackend::prepared_read_lock(
    bool need_index, bool need_order) const {
  for (;;) {
    auto lock = read_lock();
    if ((!need_index || table_->index_ready()) && (!need_order || table_->ordered())) {
      return lock;
    }
    // Deferred work (an index after restore, ordering after a bulk put_many) changes the
    // table's layout, not its contents: done once under the write lock.
    lock.unlock();
    const WriteGuard write(*this);
    if (need_index) table_->ensure_index();
    if (need_order) table_->ensure_ordered();
    // Loop: a restore may swap in another table before the read lock is back.
  }
}

InMemoryStateBackend::WriteGuard InMemoryStateBackend::indexed_write_lock() {
  WriteGuard guard(*this);
  table_->ensure_index();
  return guard;
}

std::optional<std::string> InMemoryStateBackend::get(std::string_view key, double now) const {
  check_now(now);
  const std::uint32_t hash = state_key_hash(key);
  const auto lock = prepared_read_lock(/*need_index=*/true, /*need_order=*/false);
  const std::uint32_t id = table_->find(key, hash);
  if (id == kNoSlot || !table_->visible(id, now)) return std::nullopt;
  return std::string(table_->value(id));
}

void InMemoryStateBackend::put(std::string_view key, std::string_view value, double expires_at) {
  check_entry(key, value);
  check_expiry(expires_at);
  const std::uint32_t hash = state_key_hash(key);
  const auto lock = indexed_write_lock();
  Table& t = *table_;
  t.assign(t.find(key, hash), key, hash, value, expires_at);
  bump_version();
  t.maybe_compact();
}

bool InMemoryStateBackend::erase(std::string_view key, double now) {
  check_now(now);
  const std::uint32_t hash = state_key_hash(key);
  const auto lock = indexed_write_lock();
  Table& t = *table_;
  const std::uint32_t id = t.find(key, hash);
  if (id == kNoSlot) return false;
  const bool was_visible = t.visible(id, now);
  if (t.remove(id)) {
    bump_version();
    t.maybe_compact();
  }
  return was_visible;
}

bool InMemoryStateBackend::compare_and_set(std::string_view key,
                                           std::optional<std::string_view> expected,
                                           std::optional<std::string_view> desired,
                                           double expires_at, double now) {
  check_now(now);
  check_expiry(expires_at);
  if (desired) check_entry(key, *desired);
  const std::uint32_t hash = state_key_hash(key);
  const auto lock = indexed_write_lock();
  Table& t = *table_;
  const std::uint32_t id = t.find(key, hash);
  const bool present = id != kNoSlot && t.visible(id, now);
  if (present != expected.has_value()) return false;
  if (present && t.value(id) != *expected) return false;
  if (desired) {
    t.assign(id, key, hash, *desired, expires_at);
    bump_version();
  } else if (id != kNoSlot && t.remove(id)) {
    bump_version();  // also clears an expired entry that `expected == nullopt` matched
  }
  t.maybe_compact();
  return true;
}

void InMemoryStateBackend::put_many(std::span<const std::string_view> keys,
                                    std::span<const std::string_view> values,
                                    double expires_at) {
  if (keys.size() != values.size()) {
    throw InvalidArgument("state backend: put_many needs as many values as keys");
  }
  check_expiry(expires_at);
  for (std::size_t i = 0; i < keys.size(); ++i) check_entry(keys[i], values[i]);
  if (keys.empty()) return;
  const auto lock = indexed_write_lock();
  Table& t = *table_;
  // Every argument is checked above, so only running out of memory can stop the batch
  // part-way; the pairs applied by then stay applied (each one atomically).
  t.put_batch(keys, values, expires_at);
  bump_version();
  t.maybe_compact();
}

ValueBatch InMemoryStateBackend::get_many(std::span<const std::string_view> keys,
                                          double now) const {
  ValueBatch out;
  get_many(keys, now, out);
  return out;
}

void InMemoryStateBackend::get_many(std::span<const std::string_view> keys, double now,
                                    ValueBatch& out) const {
  check_now(now);
  out.bytes.clear();
  out.sizes.resize(keys.size());
  const auto lock = prepared_read_lock(/*need_index=*/true, /*need_order=*/false);
  const Table& t = *table_;
  t.find_each(keys, [&](std::size_t i, std::uint32_t /*hash*/, std::uint32_t id) {
    if (id == kNoSlot || !t.visible(id, now)) {
      out.sizes[i] = ValueBatch::kMissing;
      return;
    }
    const std::string_view v = t.value(id);
    out.bytes.append(v);
    out.sizes[i] = v.size();
  });
}

std::size_t InMemoryStateBackend::erase_many(std::span<const std::string_view> keys,
                                             double now) {
  check_now(now);
  if (keys.empty()) return 0;
  const auto lock = indexed_write_lock();
  Table& t = *table_;
  std::size_t removed_visible = 0;
  bool changed = false;
  t.find_each(keys, [&](std::size_t /*i*/, std::uint32_t /*hash*/, std::uint32_t id) {
    if (id == kNoSlot) return;
    if (t.visible(id, now)) ++removed_visible;
    changed |= t.remove(id);
  });
  if (changed) {
    bump_version();
    t.maybe_compact();
  }
  return removed_visible;
}

EntryBatch InMemoryStateBackend::range_scan(std::string_view prefix, double now) const {
  EntryBatch out;
  range_scan(prefix, now, [&out](std::string_view k, std::string_view v) {
    out.bytes.append(k);
    out.bytes.append(v);
    out.key_sizes.push_back(static_cast<std::uint32_t>(k.size()));
    out.value_sizes.push_back(static_cast<std::uint32_t>(v.size()));
  });
  return out;
}

void InMemoryStateBackend::range_scan(
    std::string_view prefix, double now,
    const std::function<void(std::string_view, std::string_view)>& visit) const {
  check_now(now);
  const auto lock = prepared_read_lock(/*need_index=*/false, /*need_order=*/true);
  const Table& t = *table_;
  t.for_each_in_order(prefix, [&](std::uint32_t id) {
    if (t.visible(id, now)) visit(t.key(id), t.value(id));
  });
}

std::size_t InMemoryStateBackend::erase_prefix(std::string_view prefix, double now) {
  check_now(now);
  const auto lock = write_lock();
  Table& t = *table_;
  t.ensure_ordered();
  std::vector<std::uint32_t> ids;
  t.for_each_in_order(prefix, [&](std::uint32_t id) {
    if (t.stored(id)) ids.push_back(id);
  });
  std::size_t removed_visible = 0;
  for (const std::uint32_t id : ids) {
    if (t.visible(id, now)) ++removed_visible;
    t.remove(id);
  }
  if (!ids.empty()) {
    bump_version();
    t.maybe_compact();
  }
  return removed_visible;
}

std::size_t InMemoryStateBackend::purge_expired(double now) {
  check_now(now);
  const auto lock = write_lock();
  Table& t = *table_;
  std::size_t purged = 0;
  for (std::size_t id = 0; id < t.slot_count(); ++id) {
    const auto slot = static_cast<std::uint32_t>(id);
    if (t.stored(slot) && !t.visible(slot, now)) {
      t.remove(slot);
      ++purged;
    }
  }
  if (purged != 0) {
    bump_version();
    t.maybe_compact();
  }
  return purged;
}

std::unique_lock<std::mutex> InMemoryStateBackend::capture_lock() {
  std::unique_lock lock(capture_mutex_, std::try_to_lock);
  if (!lock.owns_lock()) {
    const WaitScope wait(options_.hooks);
    lock.lock();
  }
  return lock;
}

void InMemoryStateBackend::captured(std::string_view data, std::uint64_t checkpoint_id,
                                    std::uint64_t sequence, double captured_at) noexcept {
  identity_ = record_identity(data);
  checkpoint_id_ = checkpoint_id;
  sequence_ = sequence;
  captured_at_ = captured_at;
  table_->reset_tracking();
}

std::size_t InMemoryStateBackend::checkpoint(std::uint64_t checkpoint_id, double now,
                                             const std::function<char*(std::size_t)>& allocate) {
  check_now(now);
  const auto capture = capture_lock();
  const auto lock = prepared_read_lock(/*need_index=*/false, /*need_order=*/true);
  const Table& t = *table_;
  const Table::CheckpointShape shape = t.checkpoint_shape(now);
  char* out = allocate(shape.bytes);
  const std::size_t written = t.write_checkpoint(out, shape.bytes, checkpoint_id, now);
  if (written != shape.bytes) throw std::logic_error("state backend: checkpoint size mismatch");
  captured({out, written}, checkpoint_id, 0, now);
  return written;
}

std::string InMemoryStateBackend::checkpoint_delta(std::uint64_t checkpoint_id, double now) {
  check_now(now);
  const auto capture = capture_lock();
  const auto lock = prepared_read_lock(/*need_index=*/false, /*need_order=*/false);
  const Table& t = *table_;
  const std::vector<Table::DeltaChange> changes = t.changes_since_capture(captured_at_, now);
  std::string out =
      t.write_delta({checkpoint_id, checkpoint_id_, identity_, sequence_ + 1, now}, changes);
  captured(out, checkpoint_id, sequence_ + 1, now);
  return out;
}

std::uint64_t InMemoryStateBackend::apply_delta(std::string_view delta) {
  // Decoded and checked without the lock: nothing is touched until all of it passed.
  const Table::DecodedDelta decoded = Table::decode_delta(delta);
  const Table::DeltaHeader& header = decoded.header;
  const auto lock = indexed_write_lock();
  if (header.parent_identity != identity_ || header.parent_checkpoint_id != checkpoint_id_) {
    throw CorruptDataError("state backend delta: delta " + std::to_string(header.sequence) +
                           " (checkpoint " + std::to_string(header.checkpoint_id) +
                           ") follows checkpoint " + std::to_string(header.parent_checkpoint_id) +
                           ", not this backend's state (checkpoint " +
                           std::to_string(checkpoint_id_) + ", delta " +
                           std::to_string(sequence_) + " of its chain)");
  }
  if (table_->has_changes()) {
    throw CorruptDataError("state backend delta: this backend was written to since checkpoint " +
                           std::to_string(checkpoint_id_) +
                           ", so it is no longer the state the delta follows");
  }
  table_->apply_delta(decoded);
  captured(delta, header.checkpoint_id, header.sequence, header.now);
  bump_version();
  table_->maybe_compact();
  return header.checkpoint_id;
}

std::string InMemoryStateBackend::checkpoint(std::uint64_t checkpoint_id, double now) {
  std::string out;
  checkpoint(checkpoint_id, now, [&out](std::size_t n) {
    out.resize(n);
    return out.data();
  });
  return out;
}

std::uint64_t InMemoryStateBackend::restore(std::string_view snapshot,
                                            std::shared_ptr<const void> keep_alive) {
  std::uint64_t checkpoint_id = 0;
  // Parse into a private table without any lock: readers and writers carry on until the
  // swap, and a corrupt snapshot never touches the current state.
  std::unique_ptr<Table> fresh =
      Table::from_snapshot(snapshot, options_.unsorted_tail_limit, std::move(keep_alive), &checkpoint_id);
  {
    const WriteGuard lock(*this);
    table_.swap(fresh);
    captured(snapshot, checkpoint_id, 0, -kNeverExpires);
    bump_version();
  }
  return checkpoint_id;  // the old table is freed here, outside the lock
}

std::size_t InMemoryStateBackend::size() const {
  const auto lock = read_lock();
  return table_->stored_count();
}

std::size_t InMemoryStateBackend::size_bytes() const {
  const auto lock = read_lock();
  return table_->stored_bytes();
}

}  // namespace streamstate