// The data behind InMemoryStateBackend: slots, entry arena, hash index, the sorted run and
// the tail (see state_backend.h for the layout and why). Not thread-safe: the backend's
// lock guards every call.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <memory>
#include <set>
#include <stdexcept>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/byte_arena.h"
#include "core/byte_io.h"
#include "core/errors.h"
#include "core/huge_page_allocator.h"
#include "core/radix_sort.h"
#include "core/record_codec.h"
#include "core/state_backend.h"
#include "core/state_entry.h"
#include "core/state_index.h"

namespace streamstate::state_detail {

[[nodiscard]] inline bool starts_with(std::string_view s, std::string_view prefix) noexcept {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

class StateTable {
 public:
  explicit StateTable(std::size_t unsorted_tail_limit)
      : min_tail_limit_(std::max<std::size_t>(1, unsorted_tail_limit)), tail_(TailOrder{this}) {}
  StateTable(const StateTable&) = delete;
  StateTable& operator=(const StateTable&) = delete;
  StateTable(StateTable&&) = delete;
  StateTable& operator=(StateTable&&) = delete;
  ~StateTable() = default;

  // ----- reads -------------------------------------------------------------------------

  [[nodiscard]] std::string_view key(std::uint32_t id) const noexcept {
    const Slot& s = slots_[id];
    return {s.entry + 4, key_len(s)};
  }
  [[nodiscard]] std::string_view value(std::uint32_t id) const noexcept {
    const Slot& s = slots_[id];
    return {header_of(s) + 1 + (has_expiry(s) ? kExpirySize : 0), s.value_len};
  }
  // The whole entry: exactly the bytes of its checkpoint record.
  [[nodiscard]] std::string_view entry(std::uint32_t id) const noexcept {
    const Slot& s = slots_[id];
    return {s.entry, entry_size(s, s.value_len)};
  }
  [[nodiscard]] bool stored(std::uint32_t id) const noexcept {
    return slots_[id].value_len != kDead;
  }
  [[nodiscard]] bool visible(std::uint32_t id, double now) const noexcept {
    const Slot& s = slots_[id];
    return s.value_len != kDead && (!has_expiry(s) || expiry_of(s) > now);
  }
  [[nodiscard]] std::size_t stored_count() const noexcept { return stored_; }
  [[nodiscard]] std::size_t stored_bytes() const noexcept { return stored_bytes_; }
  [[nodiscard]] std::size_t slot_count() const noexcept { return slots_.size(); }

  [[nodiscard]] std::uint32_t find(std::string_view k, std::uint32_t hash) const noexcept {
    return index_.find(hash, [this, k](std::uint32_t id) {
      const Slot& s = slots_[id];
      return key_len(s) == k.size() && (k.empty() || std::memcmp(s.entry + 4, k.data(), k.size()) == 0);
    });
  }

  // Calls on_key(i, hash, slot id or kNoSlot) for every key in order. The lookups run as a
  // software pipeline: key i's index cell is prefetched, then (a few keys later) its slot,
  // then its entry, and only then is it looked up for real, so the three dependent cache
  // misses of many keys overlap instead of queueing. on_key may insert: the earlier stages
  // only issue prefetches, so a stale guess costs nothing but time.
  template <typename OnKey>
  void find_each(std::span<const std::string_view> keys, OnKey&& on_key) const {
    constexpr std::size_t kDistance = kPipelineDistance;
    constexpr std::size_t kRing = 4 * kDistance;
    std::array<std::uint32_t, kRing> hashes{};
    std::array<std::uint32_t, kRing> candidates{};
    const std::size_t n = keys.size();
    for (std::size_t i = 0; i < n + 3 * kDistance; ++i) {
      if (i < n) {
        hashes[i % kRing] = state_key_hash(keys[i]);
        index_.prefetch(hashes[i % kRing]);
      }
      if (i >= kDistance && i - kDistance < n) {
        const std::size_t k = (i - kDistance) % kRing;
        candidates[k] = index_.first_candidate(hashes[k]);
        if (candidates[k] != kNoSlot) __builtin_prefetch(&slots_[candidates[k]]);
      }
      if (i >= 2 * kDistance && i - 2 * kDistance < n) {
        const std::size_t k = (i - 2 * kDistance) % kRing;
        if (candidates[k] != kNoSlot && candidates[k] < slots_.size()) {
          const Slot& slot = slots_[candidates[k]];
          __builtin_prefetch(slot.entry);
          __builtin_prefetch(slot.entry + 64);
        }
      }
      if (i >= 3 * kDistance) {
        const std::size_t c = i - 3 * kDistance;
        on_key(c, hashes[c % kRing], find(keys[c], hashes[c % kRing]));
      }
    }
  }

  // Calls fn(id) for every slot (visible or not) whose key starts with `prefix`, in key
  // order: binary searches into the run, an ordered walk of the tail, merged. Requires an
  // ordered tail (ensure_ordered).
  template <typename Fn>
  void for_each_in_order(std::string_view prefix, Fn&& fn) const {
    // The run's matches are exactly [first key >= prefix, first key past every extension of
    // prefix): two binary searches, and no per-entry prefix test on the walk.
    const std::size_t lo = run_lower_bound(prefix);
    std::size_t hi = run_;
    std::string bound(prefix);
    while (!bound.empty() && static_cast<unsigned char>(bound.back()) == 0xff) bound.pop_back();
    if (!bound.empty()) {
      bound.back() = static_cast<char>(static_cast<unsigned char>(bound.back()) + 1);
      hi = run_lower_bound(bound);
    }
    const std::vector<std::uint32_t> tail = tail_in_order(prefix);
    if (tail.empty()) {
      for (std::size_t i = lo; i < hi; ++i) fn(static_cast<std::uint32_t>(i));
      return;
    }
    std::size_t i = lo;
    std::size_t j = 0;
    while (i < hi || j < tail.size()) {
      if (i < hi && (j == tail.size() || key(static_cast<std::uint32_t>(i)) < key(tail[j]))) {
        fn(static_cast<std::uint32_t>(i++));
      } else {
        fn(tail[j++]);
      }
    }
  }

  // ----- deferred work ---------------------------------------------------------------

  [[nodiscard]] bool index_ready() const noexcept { return index_ready_; }
  [[nodiscard]] bool ordered() const noexcept { return tail_ordered_; }

  // Builds the hash index a restored table defers. Strong guarantee.
  void ensure_index() {
    if (index_ready_) return;
    StateIndex index;
    index.build(slots_.size(), [this](std::size_t id) {
      return state_key_hash(key(static_cast<std::uint32_t>(id)));
    });
    index_.swap(index);
    index_ready_ = true;
  }

  // Merges an unordered tail into the run (the deferred half of a bulk put_many).
  void ensure_ordered() {
    if (!tail_ordered_) rebuild();
  }

  // Buffers a compaction stopped using (a restored snapshot's owner) for the caller to
  // release after unlocking: releasing may need a lock of the embedding's (the GIL).
  [[nodiscard]] std::vector<std::shared_ptr<const void>> take_retired() noexcept {
    return std::exchange(retired_, {});
  }

  // ----- writes (exclusive lock held) ------------------------------------------------

  // Stores key -> value at `id` (an existing slot, live or deleted) or in a new slot when id
  // is kNoSlot, and returns the slot id. A new slot joins the ordered tail set when
  // `keep_order` and the tail is still ordered; otherwise the tail becomes unordered until
  // the next ordered read merges it (ensure_ordered). Strong guarantee: everything that can
  // fail (growth, the set's node) happens before the first change or is rolled back.
  std::uint32_t assign(std::uint32_t id, std::string_view k, std::uint32_t hash,
                       std::string_view v, double expires_at, bool keep_order = true) {
    const bool expiring = expires_at != kNeverExpires;
    if (id != kNoSlot) {
      const Slot& s = slots_[id];
      // Same size, same layout, in our own memory: overwrite in place, so counters and
      // fixed-width aggregates never grow the arena. An entry that has an expiry field keeps
      // it (+inf meaning never) rather than move.
      if (s.value_len != kDead && v.size() == s.value_len &&
          (expiring == has_expiry(s) || has_expiry(s)) && !arena_.is_external(s.entry)) {
        char* header = const_cast<char*>(header_of(s));
        char* body = header + 1;
        if (has_expiry(s)) {
          const auto bits64 = std::bit_cast<std::uint64_t>(expires_at);
          store_u32(body, static_cast<std::uint32_t>(bits64));
          store_u32(body + 4, static_cast<std::uint32_t>(bits64 >> 32));
          body += kExpirySize;
        }
        copy_bytes(body, v.data(), v.size());
        mark_changed(id);
        return id;
      }
    }
    const std::uint32_t bits = static_cast<std::uint32_t>(k.size()) | (expiring ? kHasExpiry : 0);
    return place(id, k, hash, entry_size(k.size(), v.size(), expiring), bits,
                 static_cast<std::uint32_t>(v.size()), keep_order,
                 [&](char* out) noexcept { write_entry(out, k, v, expiring, expires_at); });
  }

  // Stores a fresh entry of `size` bytes, laid out by write(out), at `id` (replacing whatever
  // the slot held) or in a new slot (kNoSlot); `bits` and `value_len` describe it as a
  // Slot does. The rest is assign's contract.
  template <typename Write>
  std::uint32_t place(std::uint32_t id, std::string_view k, std::uint32_t hash, std::size_t size,
                      std::uint32_t bits, std::uint32_t value_len, bool keep_order, Write&& write) {
    const bool expiring = (bits & kHasExpiry) != 0;
    if (id == kNoSlot) {
      if (slots_.size() >= kMaxSlots) {
        throw InvalidArgument("state backend: more than 2^32-2 entries");
      }
      index_.grow_for(slots_.size() + 1);
      grow_tracking(slots_.size() + 1);
      arena_.reserve(size);
      slots_.push_back(Slot{nullptr, bits, value_len});
      id = static_cast<std::uint32_t>(slots_.size() - 1);
      char* out = arena_.take(size);
      write(out);
      slots_.back().entry = out;
      if (keep_order && tail_ordered_) {
        try {
          tail_.insert(id);
        } catch (...) {
          slots_.pop_back();
          arena_.give_back(size);
          throw;
        }
      } else if (!keep_order) {
        tail_ordered_ = false;
      }
      index_.insert(hash, id);
      count_in(k.size(), value_len, expiring);
      mark_changed(id);
      set_bit(created_, id);
      return id;
    }
    Slot& s = slots_[id];
    arena_.reserve(size);
    if (s.value_len != kDead) {
      count_out(s);
      garbage_ += entry_size(s, s.value_len);
    } else {
      --dead_;  // revived; its old entry was counted as garbage when it was deleted
    }
    char* out = arena_.take(size);
    write(out);
    s = Slot{out, bits, value_len};
    count_in(k.size(), value_len, expiring);
    mark_changed(id);
    return id;
  }

  // put_many, in one pipelined pass: keys that have a slot are updated in place, new keys
  // are appended. A small batch keeps the tail ordered as it goes; a large one leaves its
  // new keys unordered, to be sorted and merged into the run by the first ordered read
  // (range scan, checkpoint), as a log-structured store defers sorting its memtable:
  // a bulk load costs hash inserts now and one sort later, however many batches it takes.
  void put_batch(std::span<const std::string_view> keys, std::span<const std::string_view> values,
                 double expires_at) {
    if (keys.size() > kMaxSlots - slots_.size()) {
      throw InvalidArgument("state backend: more than 2^32-2 entries");
    }
    const bool keep_order = slots_.size() - run_ + keys.size() <= tail_limit();
    find_each(keys, [&](std::size_t i, std::uint32_t hash, std::uint32_t id) {
      assign(id, keys[i], hash, values[i], expires_at, keep_order);
    });
    order_small_tail();
  }

  // Mostly updates after all: ordering a few unordered new keys now is cheaper than a merge.
  void order_small_tail() noexcept {
    if (!tail_ordered_ && slots_.size() - run_ <= tail_limit()) {
      try {
        for (std::size_t id = run_; id < slots_.size(); ++id) {
          tail_.insert(static_cast<std::uint32_t>(id));
        }
        tail_ordered_ = true;
      } catch (const std::bad_alloc&) {
        // Stays unordered: the next ordered read merges it.
      }
    }
  }

  // Marks a slot deleted; returns whether it held an entry.
  bool remove(std::uint32_t id) noexcept {
    Slot& s = slots_[id];
    if (s.value_len == kDead) return false;
    mark_changed(id);
    count_out(s);
    garbage_ += entry_size(s, s.value_len);
    ++dead_;
    s.value_len = kDead;
    return true;
  }

  // Compacts when the tail, dead slots or dead arena bytes outgrow their share.
  void maybe_compact() noexcept {
    if (!needs_compaction()) return;
    try {
      rebuild();
    } catch (const std::bad_alloc&) {
      // Compaction only reorganises; the table stays valid, and a later write retries.
    }
  }

  // An unordered tail is left for the next ordered read; an ordered one is merged when
  // the set grows past its share, as are dead slots and garbage bytes.
  [[nodiscard]] bool needs_compaction() const noexcept {
    return (tail_ordered_ && slots_.size() - run_ > tail_limit()) ||
           dead_ > std::max(min_tail_limit_, slots_.size() / 4) ||
           garbage_ > std::max(64 * min_tail_limit_, stored_entry_bytes_);
  }

  // Merges the run and the tail into a fresh run whose entries lie in key order in one
  // chunk; drops deleted slots, garbage bytes, the tail set and any restored snapshot, and
  // rebuilds the index once. Strong guarantee: builds aside, then swaps.
  void rebuild() {
    std::vector<std::uint32_t> tail;
    tail.reserve(slots_.size() - run_);
    if (tail_ordered_) {
      for (const std::uint32_t id : tail_) {
        if (stored(id)) tail.push_back(id);  // the set is already in key order
      }
    } else {
      for (std::size_t id = run_; id < slots_.size(); ++id) {
        if (stored(static_cast<std::uint32_t>(id))) tail.push_back(static_cast<std::uint32_t>(id));
      }
      sort_ids_by_key(tail, [this](std::uint32_t id) { return key(id); });
    }
    HugePageVector<Slot> slots;
    slots.reserve(stored_);
    ByteArena arena;
    arena.reserve(std::max<std::size_t>(stored_entry_bytes_, 1));
    // The change tracking follows its slots to their new ids.
    std::vector<std::uint64_t> changed(tracking_words(stored_), 0);
    std::vector<std::uint64_t> created(changed.size(), 0);
    std::size_t changed_count = 0;
    const auto move_slot = [&](std::uint32_t id) {
      const std::string_view bytes = entry(id);
      char* out = arena.take(bytes.size());
      copy_bytes(out, bytes.data(), bytes.size());
      const auto moved = static_cast<std::uint32_t>(slots.size());
      slots.push_back(Slot{out, slots_[id].key_bits, slots_[id].value_len});
      if (bit(changed_, id)) {
        set_bit(changed, moved);
        ++changed_count;
      }
      if (bit(created_, id)) set_bit(created, moved);
    };
    std::size_t r = 0;
    std::size_t t = 0;
    for (;;) {
      if (t + kPipelineDistance < tail.size()) {
        // Tail entries sit in insertion order, so in key order they are scattered.
        __builtin_prefetch(slots_[tail[t + kPipelineDistance]].entry);
      }
      while (r < run_ && !stored(static_cast<std::uint32_t>(r))) ++r;
      if (r < run_ && (t == tail.size() || key(static_cast<std::uint32_t>(r)) < key(tail[t]))) {
        move_slot(static_cast<std::uint32_t>(r++));
      } else if (t < tail.size()) {
        move_slot(tail[t++]);
      } else {
        break;
      }
    }
    StateIndex index;
    index.build(slots.size(), [&](std::size_t id) {
      return state_key_hash({slots[id].entry + 4, key_len(slots[id])});
    });
    retired_.reserve(retired_.size() + 1);
    // A deleted slot that held a captured entry takes its key with it: remember the key, so
    // the next delta still removes it. (Keys created since the capture need no record.)
    std::size_t dropped_keys = 0;
    std::size_t dropped_bytes = 0;
    for (std::size_t id = 0; id < slots_.size(); ++id) {
      if (dropped_tracked(static_cast<std::uint32_t>(id))) {
        ++dropped_keys;
        dropped_bytes += key_len(slots_[id]);
      }
    }
    removed_key_sizes_.reserve(removed_key_sizes_.size() + dropped_keys);
    removed_key_bytes_.reserve(removed_key_bytes_.size() + dropped_bytes);
    // Commit: nothing below can throw (the appends fit the capacity just reserved).
    for (std::size_t id = 0; id < slots_.size() && dropped_keys != 0; ++id) {
      if (dropped_tracked(static_cast<std::uint32_t>(id))) {
        const std::string_view k = key(static_cast<std::uint32_t>(id));
        removed_key_bytes_.append(k);
        removed_key_sizes_.push_back(static_cast<std::uint32_t>(k.size()));
      }
    }
    changed_.swap(changed);
    created_.swap(created);
    changed_count_ = changed_count;
    slots_.swap(slots);
    arena_.swap(arena);
    if (auto owner = arena.release_external()) retired_.push_back(std::move(owner));
    index_.swap(index);
    tail_.clear();
    tail_ordered_ = true;
    index_ready_ = true;
    run_ = slots_.size();
    dead_ = 0;
    garbage_ = 0;
  }

  // ----- checkpoint --------------------------------------------------------------------

  struct CheckpointShape {
    std::size_t entries = 0;
    std::size_t bytes = 0;
  };

  [[nodiscard]] CheckpointShape checkpoint_shape(double now) const {
    CheckpointShape shape;
    shape.bytes = kRecordHeaderSize + kRecordEntryOverhead + kHeaderKey.size() +
                  kHeaderValueSize + kRecordTrailerSize;
    if (expiring_ == 0) {
      // Nothing can have expired: the running totals are exact without a pass.
      shape.entries = stored_;
      shape.bytes += stored_entry_bytes_;
    } else {
      for_each_in_order({}, [&](std::uint32_t id) {
        if (!visible(id, now)) return;
        ++shape.entries;
        shape.bytes += entry_size(slots_[id], slots_[id].value_len);
      });
    }
    if (shape.entries >= std::numeric_limits<std::uint32_t>::max()) {
      throw InvalidArgument("state backend: too many entries for one checkpoint");
    }
    return shape;
  }

  std::size_t write_checkpoint(char* out, std::size_t capacity, std::uint64_t checkpoint_id,
                               double now) const {
    RecordBufferWriter writer(out, capacity, RecordKind::kStateBackend);
    writer.begin(kHeaderKey, kHeaderValueSize);
    writer.u64(checkpoint_id);
    writer.u32(kLayoutVersion);
    for_each_in_order({}, [&](std::uint32_t id) {
      if (visible(id, now)) writer.add_encoded(entry(id));
    });
    return writer.finish();
  }

  // Checks a whole snapshot and builds a table over it; throws CorruptDataError. With
  // `keep_alive` the table uses the snapshot's bytes in place (it must not change while
  // keep_alive is held); without, it copies them once.
  static std::unique_ptr<StateTable> from_snapshot(std::string_view snapshot, std::size_t unsorted_tail_limit,
                                              std::shared_ptr<const void> keep_alive,
                                              std::uint64_t* checkpoint_id) {
    SinglePassRecordReader reader(snapshot, RecordKind::kStateBackend);
    RecordView record;
    if (!reader.next(record)) throw CorruptDataError("state backend snapshot: no header record");
    if (record.key != kHeaderKey || record.value.size() != kHeaderValueSize) {
      throw CorruptDataError("state backend snapshot: malformed header record");
    }
    const std::uint64_t id = load_u64(record.value.data());
    const std::uint32_t layout = load_u32(record.value.data() + 8);
    if (layout != kLayoutVersion) {
      throw CorruptDataError("state backend snapshot: unsupported layout version " +
                             std::to_string(layout));
    }
    // Each record is already an entry. The hash index is left for the first point
    // operation: a restore followed by a checkpoint or range scans never needs it.
    auto table = std::make_unique<StateTable>(unsorted_tail_limit);
    table->slots_.reserve(reader.count() - 1);
    table->index_ready_ = false;
    const char* base = snapshot.data();
    if (keep_alive) {
      table->arena_.adopt_external(snapshot, std::move(keep_alive));
    } else {
      table->arena_.reserve(snapshot.size());
      char* copy = table->arena_.take(snapshot.size());
      copy_bytes(copy, snapshot.data(), snapshot.size());
      base = copy;
    }
    std::string_view previous;
    for (std::size_t n = 0; reader.next(record); ++n) {
      if (n > 0 && !(previous < record.key)) {
        throw CorruptDataError("state backend snapshot: keys out of order or repeated at entry " +
                               std::to_string(n));
      }
      previous = record.key;
      const EntryShape shape = entry_shape(record, n, "state backend snapshot");
      const std::size_t offset = static_cast<std::size_t>(record.key.data() - snapshot.data()) - 4;
      table->slots_.push_back(Slot{base + offset, shape.key_bits, shape.value_len});
      table->count_in(record.key.size(), shape.value_len, (shape.key_bits & kHasExpiry) != 0);
    }
    reader.finish();  // nothing above is visible to anyone until this passes
    table->run_ = table->slots_.size();
    table->grow_tracking(table->slots_.size());
    if (checkpoint_id != nullptr) *checkpoint_id = id;
    return table;
  }

  // ----- change tracking and deltas ----------------------------------------------------
  //
  // Why bitmaps. The tracking sits on the write path of every put, so it is one bit per
  // slot (a slot written since the last capture) and a second for slots created since it
  // (their keys were not in the captured state): setting a bit in a bitmap 1/128 the size
  // of the slots costs no allocation and rarely a cache miss, where a change log would
  // copy every first-changed key. A delta walks the bitmap, 64 slots per word. Deleted
  // slots keep their keys until a compaction drops them; then the keys of the captured
  // ones move to a side list, so the delta still removes them. Expiry changes what is
  // visible without any write, so a delta also passes over the untouched entries that
  // carry an expiry (only when there are any), as a full checkpoint already does.

  [[nodiscard]] bool has_changes() const noexcept {
    return changed_count_ != 0 || !removed_key_sizes_.empty();
  }

  void reset_tracking() noexcept {
    std::fill(changed_.begin(), changed_.end(), std::uint64_t{0});
    std::fill(created_.begin(), created_.end(), std::uint64_t{0});
    changed_count_ = 0;
    std::string().swap(removed_key_bytes_);
    std::vector<std::uint32_t>().swap(removed_key_sizes_);
  }

  // A key a delta writes: its slot (the entry as it is now, or gone), or kNoSlot for a key
  // whose deleted slot a compaction dropped.
  struct DeltaChange {
    std::string_view key;
    std::uint32_t id;
  };

  // Every key whose visible entry at `now` may differ from the last capture, taken at
  // `captured_at` (-inf: unknown, after a restore), sorted by key, each key once. Slots of
  // the run are in key order already, so only the tail's and the dropped keys are sorted.
  [[nodiscard]] std::vector<DeltaChange> changes_since_capture(double captured_at,
                                                               double now) const {
    std::vector<DeltaChange> in_run;
    std::vector<DeltaChange> others;
    const auto add = [&](std::uint32_t id) {
      (id < run_ ? in_run : others).push_back({key(id), id});
    };
    for (std::size_t w = 0; w < changed_.size(); ++w) {
      for (std::uint64_t word = changed_[w]; word != 0; word &= word - 1) {
        const auto id =
            static_cast<std::uint32_t>(w * 64 + static_cast<std::size_t>(std::countr_zero(word)));
        // Created and gone again since the capture: the captured state never had it.
        if (bit(created_, id) && !visible(id, now)) continue;
        add(id);
      }
    }
    bool run_in_id_order = true;
    if (expiring_ != 0 && captured_at != now) {
      const std::size_t written = in_run.size();
      for (std::size_t i = 0; i < slots_.size(); ++i) {
        const auto id = static_cast<std::uint32_t>(i);
        if (bit(changed_, id) || !stored(id) || !has_expiry(slots_[id])) continue;
        if (visible(id, captured_at) != visible(id, now)) add(id);
      }
      run_in_id_order = in_run.size() == written;
    }
    if (!run_in_id_order) {
      std::sort(in_run.begin(), in_run.end(),
                [](const DeltaChange& a, const DeltaChange& b) { return a.id < b.id; });
    }
    std::size_t offset = 0;
    for (const std::uint32_t size : removed_key_sizes_) {
      others.push_back({std::string_view(removed_key_bytes_).substr(offset, size), kNoSlot});
      offset += size;
    }
    // A key dropped by a compaction and stored again has a slot too: the slot is the truth.
    const auto by_key = [](const DeltaChange& a, const DeltaChange& b) {
      if (a.key != b.key) return a.key < b.key;
      return a.id != kNoSlot && b.id == kNoSlot;
    };
    std::sort(others.begin(), others.end(), by_key);
    std::vector<DeltaChange> out;
    out.reserve(in_run.size() + others.size());
    std::merge(in_run.begin(), in_run.end(), others.begin(), others.end(), std::back_inserter(out),
               by_key);
    out.erase(std::unique(out.begin(), out.end(),
                          [](const DeltaChange& a, const DeltaChange& b) { return a.key == b.key; }),
              out.end());
    return out;
  }

  struct DeltaHeader {
    std::uint64_t checkpoint_id = 0;
    std::uint64_t parent_checkpoint_id = 0;
    std::uint32_t parent_identity = 0;
    std::uint64_t sequence = 0;
    double now = 0;
  };

  // The delta container (layout in state_entry.h) for `changes` as of header.now.
  [[nodiscard]] std::string write_delta(const DeltaHeader& header,
                                        const std::vector<DeltaChange>& changes) const {
    std::size_t bytes = kRecordHeaderSize + kRecordEntryOverhead + kHeaderKey.size() +
                        kDeltaHeaderValueSize + kRecordTrailerSize;
    for (const DeltaChange& c : changes) {
      bytes += upserted(c, header.now) ? entry(c.id).size() : kRecordEntryOverhead + c.key.size() + 1;
    }
    std::string out(bytes, '\0');
    RecordBufferWriter writer(out.data(), out.size(), RecordKind::kStateBackendDelta);
    writer.begin(kHeaderKey, kDeltaHeaderValueSize);
    writer.u32(kDeltaLayoutVersion);
    writer.u64(header.checkpoint_id);
    writer.u64(header.parent_checkpoint_id);
    writer.u32(header.parent_identity);
    writer.u64(header.sequence);
    writer.u64(std::bit_cast<std::uint64_t>(header.now));
    const char removed = static_cast<char>(kFlagRemoved);
    for (const DeltaChange& c : changes) {
      if (upserted(c, header.now)) {
        writer.add_encoded(entry(c.id));
      } else {
        writer.begin(c.key, 1);
        writer.raw(std::string_view(&removed, 1));
      }
    }
    if (writer.finish() != bytes) throw std::logic_error("state backend: delta size mismatch");
    return out;
  }

  // One change of a decoded delta: the entry's record bytes (as the arena stores them) and
  // its shape, or a removal.
  struct DeltaEntry {
    std::string_view key;
    std::string_view record;  // empty for a removal
    EntryShape shape;
    bool removed = false;
  };
  struct DecodedDelta {
    DeltaHeader header;
    std::vector<DeltaEntry> entries;
    std::size_t upsert_bytes = 0;
  };

  // Checks a whole delta (container, header, every record, key order); throws
  // CorruptDataError. Views point into `data`.
  [[nodiscard]] static DecodedDelta decode_delta(std::string_view data) {
    constexpr const char* kWhat = "state backend delta";
    RecordReader reader(data);
    reader.expect_kind(RecordKind::kStateBackendDelta);
    RecordView record;
    if (!reader.next(record) || record.key != kHeaderKey) {
      throw CorruptDataError("state backend delta: no header record");
    }
    ByteReader fields(record.value, "state backend delta header");
    const std::uint32_t layout = fields.u32();
    DecodedDelta delta;
    delta.header.checkpoint_id = fields.u64();
    delta.header.parent_checkpoint_id = fields.u64();
    delta.header.parent_identity = fields.u32();
    delta.header.sequence = fields.u64();
    delta.header.now = fields.f64();
    if (!fields.at_end()) throw CorruptDataError("state backend delta: trailing header bytes");
    if (layout != kDeltaLayoutVersion) {
      throw CorruptDataError("state backend delta: unsupported layout version " +
                             std::to_string(layout));
    }
    if (!std::isfinite(delta.header.now) || delta.header.sequence == 0) {
      throw CorruptDataError("state backend delta: malformed header");
    }
    delta.entries.reserve(reader.count() - 1);  // the reader checked count against the size
    std::string_view previous;
    for (std::size_t n = 0; reader.next(record); ++n) {
      if (n > 0 && !(previous < record.key)) {
        throw CorruptDataError("state backend delta: keys out of order or repeated at entry " +
                               std::to_string(n));
      }
      previous = record.key;
      if (record.value.size() == 1 && static_cast<unsigned char>(record.value[0]) == kFlagRemoved) {
        if (record.key.size() > kMaxStateKeySize) {
          throw CorruptDataError("state backend delta: oversized key at entry " + std::to_string(n));
        }
        delta.entries.push_back({record.key, {}, {}, true});
        continue;
      }
      const EntryShape shape = entry_shape(record, n, kWhat);
      const char* begin = record.key.data() - 4;
      const std::string_view bytes(begin, static_cast<std::size_t>(record.value.data() + record.value.size() - begin));
      delta.entries.push_back({record.key, bytes, shape, false});
      delta.upsert_bytes += bytes.size();
    }
    return delta;
  }

  // Applies a decoded delta, all of it or (on running out of memory) none: every
  // allocation is made before the first change. Requires the index (ensure_index).
  void apply_delta(const DecodedDelta& delta) {
    // Keys are unique in a delta, so the slots found first stay right throughout.
    std::vector<std::uint32_t> hashes(delta.entries.size());
    std::vector<std::uint32_t> ids(delta.entries.size());
    std::size_t new_keys = 0;
    for (std::size_t i = 0; i < delta.entries.size(); ++i) {
      hashes[i] = state_key_hash(delta.entries[i].key);
      ids[i] = find(delta.entries[i].key, hashes[i]);
      if (ids[i] == kNoSlot && !delta.entries[i].removed) ++new_keys;
    }
    if (new_keys > kMaxSlots - slots_.size()) {
      throw InvalidArgument("state backend: more than 2^32-2 entries");
    }
    const std::size_t most = slots_.size() + new_keys;
    index_.grow_for(most);
    grow_tracking(most);
    if (most > slots_.capacity()) slots_.reserve(std::max(most, 2 * slots_.capacity()));
    if (delta.upsert_bytes != 0) arena_.reserve(delta.upsert_bytes);
    // Nothing below allocates: each place() finds its room already reserved, and new keys
    // join the tail unordered (no set nodes), ordered afterwards or by the next ordered read.
    for (std::size_t i = 0; i < delta.entries.size(); ++i) {
      const DeltaEntry& e = delta.entries[i];
      if (e.removed) {
        if (ids[i] != kNoSlot) remove(ids[i]);
        continue;
      }
      place(ids[i], e.key, hashes[i], e.record.size(), e.shape.key_bits, e.shape.value_len,
            /*keep_order=*/false,
            [&e](char* out) noexcept { copy_bytes(out, e.record.data(), e.record.size()); });
    }
    order_small_tail();
  }

 private:
  // Orders tail slot ids by key, for the std::set and for lookups by prefix.
  struct TailOrder {
    using is_transparent = void;
    const StateTable* table;
    bool operator()(std::uint32_t a, std::uint32_t b) const noexcept {
      return table->key(a) < table->key(b);
    }
    bool operator()(std::uint32_t a, std::string_view b) const noexcept {
      return table->key(a) < b;
    }
    bool operator()(std::string_view a, std::uint32_t b) const noexcept {
      return a < table->key(b);
    }
  };

  // Checks an entry record's key size and value header (flags, expiry) and returns its
  // slot shape; throws CorruptDataError naming `what` and the entry.
  [[nodiscard]] static EntryShape entry_shape(const RecordView& record, std::size_t n,
                                              std::string_view what) {
    const auto fail = [&](std::string_view problem) {
      throw CorruptDataError(std::string(what) + ": " + std::string(problem) + " at entry " +
                             std::to_string(n));
    };
    if (record.key.size() > kMaxStateKeySize) fail("oversized key");
    const std::string_view v = record.value;
    const unsigned char flags = v.empty() ? 0xff : static_cast<unsigned char>(v[0]);
    const bool expiring = (flags & kFlagExpires) != 0;
    const std::size_t value_header = expiring ? 1 + kExpirySize : 1;
    if ((flags & ~kFlagExpires) != 0 || v.size() < value_header) fail("malformed value header");
    if (expiring) {
      const double expires_at = std::bit_cast<double>(load_u64(v.data() + 1));
      if (std::isnan(expires_at) || expires_at == -kNeverExpires) fail("invalid expiry");
    }
    if (v.size() - value_header > kMaxStateValueSize) fail("oversized value");
    return {static_cast<std::uint32_t>(record.key.size()) | (expiring ? kHasExpiry : 0),
            static_cast<std::uint32_t>(v.size() - value_header)};
  }

  // A delta writes this change as the entry it is now (else as a removal).
  [[nodiscard]] bool upserted(const DeltaChange& c, double now) const noexcept {
    return c.id != kNoSlot && visible(c.id, now);
  }

  [[nodiscard]] static std::size_t tracking_words(std::size_t slots) noexcept {
    return (slots + 63) / 64;
  }
  [[nodiscard]] static bool bit(const std::vector<std::uint64_t>& bits, std::uint32_t id) noexcept {
    return ((bits[id / 64] >> (id % 64)) & 1) != 0;
  }
  static void set_bit(std::vector<std::uint64_t>& bits, std::uint32_t id) noexcept {
    bits[id / 64] |= std::uint64_t{1} << (id % 64);
  }
  // Room in the tracking bitmaps for `slots` slots; strong guarantee (spare words are zero).
  void grow_tracking(std::size_t slots) {
    const std::size_t words = tracking_words(slots);
    if (changed_.size() >= words) return;
    created_.resize(words, 0);
    changed_.resize(words, 0);
  }
  void mark_changed(std::uint32_t id) noexcept {
    std::uint64_t& word = changed_[id / 64];
    const std::uint64_t mask = std::uint64_t{1} << (id % 64);
    if ((word & mask) == 0) {
      word |= mask;
      ++changed_count_;
    }
  }
  // A deleted slot whose key was in the captured state (so a delta must remove it).
  [[nodiscard]] bool dropped_tracked(std::uint32_t id) const noexcept {
    return !stored(id) && bit(changed_, id) && !bit(created_, id);
  }

  void count_in(std::size_t k, std::size_t v, bool expiring) noexcept {
    ++stored_;
    stored_bytes_ += k + v;
    stored_entry_bytes_ += entry_size(k, v, expiring);
    if (expiring) ++expiring_;
  }
  void count_out(const Slot& s) noexcept {
    --stored_;
    stored_bytes_ -= std::size_t{key_len(s)} + s.value_len;
    stored_entry_bytes_ -= entry_size(s, s.value_len);
    if (has_expiry(s)) --expiring_;
  }

  // How many keys the ordered tail set may hold before they are merged into the run.
  [[nodiscard]] std::size_t tail_limit() const noexcept {
    return std::max(min_tail_limit_, run_ / 8);
  }

  // The first run position whose key is >= `key_bound` (run_ if none).
  [[nodiscard]] std::size_t run_lower_bound(std::string_view key_bound) const noexcept {
    std::size_t lo = 0;
    std::size_t hi = run_;
    while (lo < hi) {
      const std::size_t mid = lo + (hi - lo) / 2;
      if (key(static_cast<std::uint32_t>(mid)) < key_bound) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    return lo;
  }

  [[nodiscard]] std::vector<std::uint32_t> tail_in_order(std::string_view prefix) const {
    std::vector<std::uint32_t> ids;
    for (auto it = tail_.lower_bound(prefix); it != tail_.end() && starts_with(key(*it), prefix);
         ++it) {
      ids.push_back(*it);
    }
    return ids;
  }

  std::size_t min_tail_limit_;
  HugePageVector<Slot> slots_;
  ByteArena arena_;
  StateIndex index_;
  bool index_ready_ = true;  // false from restore until the first point operation
  std::size_t run_ = 0;      // slots [0, run_) are sorted by key
  std::set<std::uint32_t, TailOrder> tail_;  // slots [run_, end) in key order...
  bool tail_ordered_ = true;                 // ...unless a bulk put_many left them unordered
  std::size_t stored_ = 0;              // slots holding an entry (expired or not)
  std::size_t stored_bytes_ = 0;        // their key and value bytes
  std::size_t stored_entry_bytes_ = 0;  // their entries' bytes (what a checkpoint copies)
  std::size_t expiring_ = 0;            // stored entries with an expiry field
  std::size_t dead_ = 0;                // deleted slots awaiting compaction
  std::size_t garbage_ = 0;             // entry bytes no slot refers to
  std::vector<std::shared_ptr<const void>> retired_;
  // Change tracking since the last capture (see has_changes): bit per slot.
  std::vector<std::uint64_t> changed_;
  std::vector<std::uint64_t> created_;
  std::size_t changed_count_ = 0;
  std::string removed_key_bytes_;  // captured keys whose deleted slots were compacted away
  std::vector<std::uint32_t> removed_key_sizes_;
};

}  // namespace streamstate::state_detail
