// The open-addressing hash table for single-writer hot paths (partition-local folding,
// spill buffers): FlatTable<Keys, Value>, a power-of-two slot array probed linearly,
// pointing into a dense vector of entries, over the key flavours of key_traits.h.
// Int64 keys live in their entry; byte-string keys are copied into one arena and each
// entry caches its hash, so growth never re-hashes key bytes and mismatches are rejected
// on the hash first.
//
// Why slots + dense entries rather than entries stored in the slots: a slot is 8 bytes
// (a 32-bit hash tag and a 32-bit entry index), so probing stays inside one or two cache
// lines at any load factor, the fat values are never moved by probing, iteration is a
// linear scan in insertion order, and entry indices are stable (handy for "changed since"
// lists). The cost is a second memory access per lookup, which batch callers hide with
// prefetch_slot()/prefetch_entry() a few rows ahead.
//
// Not thread-safe: one writer, no concurrent readers. References and pointers to values
// are invalidated by any insertion that grows the table; entry indices are not.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string_view>
#include <utility>

#include "core/hash.h"
#include "core/huge_page_allocator.h"
#include "core/key_traits.h"

namespace streamstate {
namespace flat_detail {

// The probing index. A slot holds (tag << 32) | (index + 1), 0 meaning empty; the slot
// position comes from the low hash bits and the tag from the high 32, so a tag match is a
// near-certain hit before the entry is touched.
class SlotIndex {
 public:
  static constexpr std::size_t kNotFound = std::numeric_limits<std::size_t>::max();
  // Entry indices are stored in 32 bits.
  static constexpr std::size_t kMaxEntries = std::numeric_limits<std::uint32_t>::max() - 1;

  [[nodiscard]] std::size_t capacity() const noexcept { return slots_.size(); }

  // Largest entry count the current slot array holds without growing (load <= 3/4).
  [[nodiscard]] std::size_t max_load() const noexcept {
    return slots_.size() - slots_.size() / 4;
  }

  [[nodiscard]] std::size_t position(std::uint64_t hash) const noexcept {
    return static_cast<std::size_t>(hash) & mask_;
  }

  [[nodiscard]] static std::uint64_t tag(std::uint64_t hash) noexcept { return hash >> 32; }

  [[nodiscard]] std::uint64_t slot(std::size_t pos) const noexcept { return slots_[pos]; }
  [[nodiscard]] std::size_t next(std::size_t pos) const noexcept { return (pos + 1) & mask_; }

  [[nodiscard]] const std::uint64_t* slot_address(std::uint64_t hash) const noexcept {
    return slots_.empty() ? nullptr : &slots_[position(hash)];
  }

  void set(std::size_t pos, std::uint64_t hash, std::size_t index) noexcept {
    slots_[pos] = (tag(hash) << 32) | static_cast<std::uint64_t>(index + 1);
  }

  // Rebuilds the slot array for `capacity` slots (a power of two) from entry hashes.
  template <class HashOf>
  void rebuild(std::size_t capacity, std::size_t count, HashOf&& hash_of) {
    HugePageVector<std::uint64_t> fresh(capacity, 0);
    slots_.swap(fresh);
    mask_ = capacity - 1;
    for (std::size_t i = 0; i < count; ++i) {
      const std::uint64_t h = hash_of(i);
      std::size_t pos = position(h);
      while (slots_[pos] != 0) pos = next(pos);
      set(pos, h, i);
    }
  }

  void clear() noexcept { std::fill(slots_.begin(), slots_.end(), std::uint64_t{0}); }

  void release() noexcept {
    HugePageVector<std::uint64_t>().swap(slots_);
    mask_ = 0;
  }

  [[nodiscard]] std::size_t memory_bytes() const noexcept {
    return huge_page_allocation_bytes(slots_.capacity() * sizeof(std::uint64_t));
  }

  // Smallest power-of-two slot count that holds `entries` at load <= 3/4 (min 16).
  [[nodiscard]] static std::size_t capacity_for(std::size_t entries) {
    if (entries > kMaxEntries) throw std::length_error("flat table: too many entries");
    std::size_t cap = 16;
    while (cap - cap / 4 < entries) cap *= 2;
    return cap;
  }

 private:
  HugePageVector<std::uint64_t> slots_;
  std::size_t mask_ = 0;
};

inline void prefetch(const void* p) noexcept {
#if defined(__GNUC__) || defined(__clang__)
  if (p != nullptr) __builtin_prefetch(p, 1, 1);
#else
  (void)p;
#endif
}

// Where a table keeps its keys: what an entry stores for one, and any storage beside the
// entries. Int64 keys are the entry's own field and hash again in a few cycles.
template <class View>
class KeyStore;

template <>
class KeyStore<std::int64_t> {
 public:
  using Stored = std::int64_t;
  [[nodiscard]] static bool matches(Stored s, std::int64_t key, std::uint64_t /*hash*/) noexcept {
    return s == key;
  }
  [[nodiscard]] static std::int64_t view(Stored s) noexcept { return s; }
  [[nodiscard]] static std::uint64_t hash(Stored s) noexcept { return Int64Keys::hash(s); }
  [[nodiscard]] static Stored add(std::int64_t key, std::uint64_t /*hash*/) noexcept { return key; }
  static void undo_add(Stored /*s*/) noexcept {}
  static void reserve(std::size_t /*bytes*/) noexcept {}
  static void clear() noexcept {}
  static void release() noexcept {}
  [[nodiscard]] static std::size_t bytes() noexcept { return 0; }
  [[nodiscard]] static std::size_t memory_bytes() noexcept { return 0; }
};

// Byte-string keys back to back in one arena; an entry holds its key's place and hash.
template <>
class KeyStore<std::string_view> {
 public:
  struct Stored {
    std::uint64_t hash;
    std::uint64_t offset;  // into the arena
    std::uint64_t length;
  };
  [[nodiscard]] bool matches(const Stored& s, std::string_view key,
                             std::uint64_t hash) const noexcept {
    return s.hash == hash && s.length == key.size() &&
           (key.empty() || std::memcmp(arena_.data() + s.offset, key.data(), key.size()) == 0);
  }
  // Invalidated by the next add (the arena may move).
  [[nodiscard]] std::string_view view(const Stored& s) const noexcept {
    return {arena_.data() + s.offset, static_cast<std::size_t>(s.length)};
  }
  [[nodiscard]] static std::uint64_t hash(const Stored& s) noexcept { return s.hash; }
  [[nodiscard]] Stored add(std::string_view key, std::uint64_t hash) {
    const std::uint64_t offset = arena_.size();
    arena_.insert(arena_.end(), key.data(), key.data() + key.size());
    return Stored{hash, offset, key.size()};
  }
  // Takes back the last add (when inserting its entry failed).
  void undo_add(const Stored& s) noexcept { arena_.resize(static_cast<std::size_t>(s.offset)); }
  void reserve(std::size_t bytes) {
    if (bytes > arena_.capacity()) arena_.reserve(bytes);
  }
  void clear() noexcept { arena_.clear(); }
  void release() noexcept { HugePageVector<char>().swap(arena_); }
  [[nodiscard]] std::size_t bytes() const noexcept { return arena_.size(); }
  [[nodiscard]] std::size_t memory_bytes() const noexcept {
    return huge_page_allocation_bytes(arena_.capacity());
  }

 private:
  HugePageVector<char> arena_;
};

}  // namespace flat_detail

// Keys -> Value, Keys being Int64Keys or BytesKeys.
template <class Keys, class Value>
class FlatTable {
  using Store = flat_detail::KeyStore<typename Keys::View>;

 public:
  using View = typename Keys::View;
  using key_type = View;
  using value_type = Value;
  static constexpr std::size_t npos = flat_detail::SlotIndex::kNotFound;

  struct Entry {
    typename Store::Stored key;  // use key_of(entry) for the key itself
    Value value;
  };

  [[nodiscard]] static std::uint64_t hash_key(View key) noexcept { return Keys::hash(key); }

  // Index of `key`'s entry and whether it was inserted (value-initialised) by this call.
  std::pair<std::size_t, bool> emplace(View key) { return emplace(key, hash_key(key)); }

  // As above with a precomputed hash_key(key) (lets batch loops hash and prefetch ahead).
  // The lookup is forced inline into batch loops (measured ~25% faster folds at 1M keys:
  // the out-of-line call kept the CPU from overlapping rows); inserting stays out of line.
  [[gnu::always_inline]] std::pair<std::size_t, bool> emplace(View key, std::uint64_t hash) {
    if (entries_.size() >= index_.max_load()) [[unlikely]] grow(entries_.size() + 1);
    const std::uint64_t want = flat_detail::SlotIndex::tag(hash);
    std::size_t pos = index_.position(hash);
    for (;;) {
      const std::uint64_t s = index_.slot(pos);
      if (s == 0) break;
      if ((s >> 32) == want) {
        const std::size_t i = static_cast<std::size_t>(s & 0xffffffffULL) - 1;
        if (store_.matches(entries_[i].key, key, hash)) return {i, false};
      }
      pos = index_.next(pos);
    }
    return {insert_at(pos, key, hash), true};
  }

  Value& find_or_insert(View key) { return entries_[emplace(key).first].value; }
  Value& find_or_insert(View key, std::uint64_t hash) {
    return entries_[emplace(key, hash).first].value;
  }

  [[nodiscard]] std::size_t find_index(View key) const noexcept {
    return find_index(key, hash_key(key));
  }
  [[nodiscard]] std::size_t find_index(View key, std::uint64_t hash) const noexcept {
    if (index_.capacity() == 0) return npos;
    const std::uint64_t want = flat_detail::SlotIndex::tag(hash);
    for (std::size_t pos = index_.position(hash);; pos = index_.next(pos)) {
      const std::uint64_t s = index_.slot(pos);
      if (s == 0) return npos;
      if ((s >> 32) == want) {
        const std::size_t i = static_cast<std::size_t>(s & 0xffffffffULL) - 1;
        if (store_.matches(entries_[i].key, key, hash)) return i;
      }
    }
  }

  [[nodiscard]] Value* find(View key) noexcept {
    const std::size_t i = find_index(key);
    return i == npos ? nullptr : &entries_[i].value;
  }
  [[nodiscard]] const Value* find(View key) const noexcept {
    const std::size_t i = find_index(key);
    return i == npos ? nullptr : &entries_[i].value;
  }

  // Batch-loop helpers: touch the slot for a hash now, and (a few rows later, once the
  // slot is cached) the entry it points at, so the real lookup hits cache.
  void prefetch_slot(std::uint64_t hash) const noexcept {
    flat_detail::prefetch(index_.slot_address(hash));
  }
  void prefetch_entry(std::uint64_t hash) const noexcept {
    const std::uint64_t* p = index_.slot_address(hash);
    if (p == nullptr) return;
    const std::uint64_t s = *p;
    if (s != 0) flat_detail::prefetch(&entries_[static_cast<std::size_t>(s & 0xffffffffULL) - 1]);
  }
  // Touches entry i (for loops that visit entries in a known, non-sequential order).
  void prefetch_index(std::size_t i) const noexcept { flat_detail::prefetch(&entries_[i]); }

  // A bytes key view is invalidated by the next insertion (the arena may move).
  [[nodiscard]] View key_at(std::size_t i) const noexcept { return store_.view(entries_[i].key); }
  [[nodiscard]] View key_of(const Entry& e) const noexcept { return store_.view(e.key); }
  // hash_key(key_at(i)), without touching key bytes where the hash is cached.
  [[nodiscard]] std::uint64_t hash_at(std::size_t i) const noexcept {
    return store_.hash(entries_[i].key);
  }
  [[nodiscard]] Value& value_at(std::size_t i) noexcept { return entries_[i].value; }
  [[nodiscard]] const Value& value_at(std::size_t i) const noexcept { return entries_[i].value; }

  // Entries in insertion order.
  [[nodiscard]] auto begin() noexcept { return entries_.begin(); }
  [[nodiscard]] auto end() noexcept { return entries_.end(); }
  [[nodiscard]] auto begin() const noexcept { return entries_.begin(); }
  [[nodiscard]] auto end() const noexcept { return entries_.end(); }

  [[nodiscard]] std::size_t size() const noexcept { return entries_.size(); }
  [[nodiscard]] bool empty() const noexcept { return entries_.empty(); }
  // Entries the slot array holds before the next insert grows it, and entries the table
  // holds before the next insert reallocates them.
  [[nodiscard]] std::size_t max_load() const noexcept { return index_.max_load(); }
  [[nodiscard]] std::size_t capacity() const noexcept { return entries_.capacity(); }
  // Total bytes of all keys held outside the entries (0 for int64 keys).
  [[nodiscard]] std::size_t key_bytes() const noexcept { return store_.bytes(); }

  // Makes room for `n` entries (and `total_key_bytes` of key arena) without rehashing or
  // reallocating.
  void reserve(std::size_t n, std::size_t total_key_bytes = 0) {
    if (n > entries_.capacity()) entries_.reserve(n);
    store_.reserve(total_key_bytes);
    if (n > index_.max_load()) grow(n);
  }

  // Drops every entry but keeps the allocated memory for reuse.
  void clear() noexcept {
    entries_.clear();
    store_.clear();
    index_.clear();
  }

  // Drops every entry and frees the memory.
  void release() noexcept {
    HugePageVector<Entry>().swap(entries_);
    store_.release();
    index_.release();
  }

  // Heap bytes currently allocated by the table (slots, entries, key arena), plus the object.
  [[nodiscard]] std::size_t memory_bytes() const noexcept {
    return sizeof(*this) + index_.memory_bytes() +
           huge_page_allocation_bytes(entries_.capacity() * sizeof(Entry)) + store_.memory_bytes();
  }

  // What memory_bytes() reports, minus the object itself, once `entries` entries and
  // `key_arena` key bytes are reserved (lets a memory budget charge growth before it happens).
  [[nodiscard]] static std::size_t reserved_bytes(std::size_t entries, std::size_t key_arena) {
    if (entries == 0) return huge_page_allocation_bytes(key_arena);
    return huge_page_allocation_bytes(flat_detail::SlotIndex::capacity_for(entries) *
                                      sizeof(std::uint64_t)) +
           huge_page_allocation_bytes(entries * sizeof(Entry)) +
           huge_page_allocation_bytes(key_arena);
  }

 private:
  [[gnu::noinline]] std::size_t insert_at(std::size_t pos, View key, std::uint64_t hash) {
    const std::size_t i = entries_.size();
    const typename Store::Stored stored = store_.add(key, hash);
    try {
      entries_.push_back(Entry{stored, Value{}});
    } catch (...) {
      store_.undo_add(stored);  // leave the table as it was
      throw;
    }
    index_.set(pos, hash, i);
    return i;
  }

  [[gnu::noinline]] void grow(std::size_t at_least) {
    const std::size_t cap =
        flat_detail::SlotIndex::capacity_for(std::max(at_least, 2 * entries_.size()));
    index_.rebuild(cap, entries_.size(), [this](std::size_t i) { return hash_at(i); });
  }

  HugePageVector<Entry> entries_;
  [[no_unique_address]] Store store_;
  flat_detail::SlotIndex index_;
};

template <class Value>
using Int64FlatTable = FlatTable<Int64Keys, Value>;
template <class Value>
using BytesFlatTable = FlatTable<BytesKeys, Value>;

}  // namespace streamstate
