// The state backend's hash index: key hash -> slot id, for point operations.
//
// Why not FlatTable. FlatTable owns its entries and hands out insertion-order indices; the
// state backend's slots belong to its table, which reorders them wholesale (a compaction
// sorts them into the run), and they are built before the index (a restore defers it).
// This index therefore maps onto someone else's slot ids, and stores in each cell the very
// 32-bit hash it probes by, so growing it moves cells without rereading a single key (the
// keys sit in the entry arena, one cache miss each). It shares FlatTable's hash and memory.
#pragma once

#include <algorithm>
#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string_view>

#include "core/hash.h"
#include "core/huge_page_allocator.h"

namespace streamstate::state_detail {

inline constexpr std::uint32_t kNoSlot = std::numeric_limits<std::uint32_t>::max();
// Slot ids travel as id + 1 in the index (0 marks an empty cell), so the last id is reserved.
inline constexpr std::size_t kMaxSlots = std::numeric_limits<std::uint32_t>::max() - 1;

// How far apart the stages of the batch lookup pipeline run: enough misses in flight to
// hide memory latency, few enough that the prefetched lines are still cached when used.
inline constexpr std::size_t kPipelineDistance = 12;

// The index's hash of a key: seeded per process, so a stream of adversarial keys cannot be
// precomputed to collide. Never persisted.
[[nodiscard]] inline std::uint32_t state_key_hash(std::string_view key) noexcept {
  const std::uint64_t h = hash_bytes(key, process_seed());
  return static_cast<std::uint32_t>(h ^ (h >> 32));
}

// Open addressing with linear probing. A cell is (hash << 32) | (slot id + 1); 0 is empty.
// Slots are only ever appended or rebuilt wholesale, never unlinked one by one, so the
// table needs neither tombstones nor backward-shift deletion. Load stays at or below 1/2.
class StateIndex {
 public:
  StateIndex() { reset(0); }

  // An empty index sized for `expected` slots at load <= 1/2 with room to spare.
  void reset(std::size_t expected) {
    const std::size_t capacity = std::bit_ceil(std::max<std::size_t>(16, 2 * expected + 2));
    HugePageVector<std::uint64_t> cells(capacity, 0);
    cells_.swap(cells);
    mask_ = capacity - 1;
  }
  [[nodiscard]] bool fits(std::size_t slots) const noexcept { return 2 * slots <= cells_.size(); }

  // Doubles until `slots` fit, moving cells by their stored hash: no key is reread.
  void grow_for(std::size_t slots) {
    if (fits(slots)) return;
    StateIndex grown;
    grown.reset(std::max(slots, cells_.size()));
    for (const std::uint64_t cell : cells_) {
      if (cell != 0) grown.insert_cell(cell);
    }
    swap(grown);
  }

  // A fresh index over slots 0..n-1, hashing ahead of the inserts so each cell is
  // prefetched a few iterations before it is written.
  template <typename HashOf>
  void build(std::size_t n, HashOf&& hash_of) {
    reset(n);
    constexpr std::size_t kAhead = 2 * kPipelineDistance;
    constexpr std::size_t kRing = 4 * kPipelineDistance;
    std::array<std::uint32_t, kRing> hashes{};
    for (std::size_t i = 0; i < std::min(n, kAhead); ++i) {
      hashes[i % kRing] = hash_of(i);
      prefetch(hashes[i % kRing]);
    }
    for (std::size_t i = 0; i < n; ++i) {
      if (i + kAhead < n) {
        hashes[(i + kAhead) % kRing] = hash_of(i + kAhead);
        prefetch(hashes[(i + kAhead) % kRing]);
      }
      insert(hashes[i % kRing], static_cast<std::uint32_t>(i));
    }
  }

  void prefetch(std::uint32_t hash) const noexcept { __builtin_prefetch(&cells_[hash & mask_]); }

  // The slot of the first cell carrying this hash tag (a prefetch hint), or kNoSlot.
  [[nodiscard]] std::uint32_t first_candidate(std::uint32_t hash) const noexcept {
    for (std::size_t i = hash & mask_;; i = (i + 1) & mask_) {
      const std::uint64_t cell = cells_[i];
      if (cell == 0) return kNoSlot;
      if (static_cast<std::uint32_t>(cell >> 32) == hash) {
        return static_cast<std::uint32_t>(cell) - 1;
      }
    }
  }

  template <typename IsKey>
  [[nodiscard]] std::uint32_t find(std::uint32_t hash, IsKey&& is_key) const noexcept {
    for (std::size_t i = hash & mask_;; i = (i + 1) & mask_) {
      const std::uint64_t cell = cells_[i];
      if (cell == 0) return kNoSlot;
      if (static_cast<std::uint32_t>(cell >> 32) == hash) {
        const auto slot = static_cast<std::uint32_t>(cell) - 1;
        if (is_key(slot)) return slot;
      }
    }
  }

  // Requires fits(slot count) after the insert.
  void insert(std::uint32_t hash, std::uint32_t slot) noexcept {
    insert_cell((static_cast<std::uint64_t>(hash) << 32) | (static_cast<std::uint64_t>(slot) + 1));
  }

  void swap(StateIndex& other) noexcept {
    cells_.swap(other.cells_);
    std::swap(mask_, other.mask_);
  }

 private:
  void insert_cell(std::uint64_t cell) noexcept {
    std::size_t i = (cell >> 32) & mask_;
    while (cells_[i] != 0) i = (i + 1) & mask_;
    cells_[i] = cell;
  }

  HugePageVector<std::uint64_t> cells_;
  std::size_t mask_ = 0;
};

}  // namespace streamstate::state_detail
