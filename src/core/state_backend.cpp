#include "core/state_backend.h"

#include <algorithm>
#include <array>
#include <bit>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <new>
#include <random>
#include <set>
#include <stdexcept>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "core/byte_io.h"
#include "core/checksum.h"
#include "core/errors.h"
#include "core/record_codec.h"

namespace streamstate {
namespace {

constexpr std::uint32_t kNoSlot = std::numeric_limits<std::uint32_t>::max();
// Slot ids travel as id + 1 in the index (0 marks an empty cell), so the last id is reserved.
constexpr std::size_t kMaxSlots = std::numeric_limits<std::uint32_t>::max() - 1;

// The checkpoint is a record container: one header record, then one record per entry,
//   [u32 key length][key][u32 record length][u8 flags][f64 expires_at if flags & 1][value]
// and an entry in memory is stored in exactly those bytes, so a checkpoint copies entries
// verbatim and a restore can use the snapshot's bytes as they are.
constexpr std::string_view kHeaderKey = "state_backend";
constexpr std::uint32_t kLayoutVersion = 1;
constexpr std::size_t kHeaderValueSize = 12;  // u64 checkpoint id, u32 layout version
constexpr unsigned char kFlagExpires = 1;
constexpr std::size_t kEntryOverhead = 4 + 4 + 1;  // two lengths and the flags byte
constexpr std::size_t kExpirySize = 8;

// How far apart the stages of the batch lookup pipeline run: enough misses in flight to
// hide memory latency, few enough that the prefetched lines are still cached when used.
constexpr std::size_t kPipelineDistance = 12;
constexpr std::size_t kRadixSortMin = 1024;
constexpr std::size_t kHugePage = std::size_t{2} << 20;
constexpr std::size_t kMinChunk = std::size_t{64} << 10;

[[nodiscard]] bool starts_with(std::string_view s, std::string_view prefix) noexcept {
  return s.size() >= prefix.size() && s.compare(0, prefix.size(), prefix) == 0;
}

// ---------------------------------------------------------------------------------------
// Hashing: a multiply-fold hash over 16-byte blocks, seeded per process so a stream of
// adversarial keys cannot be precomputed to collide. Never persisted.

__extension__ using u128 = unsigned __int128;

[[nodiscard]] std::uint64_t fold_multiply(std::uint64_t a, std::uint64_t b) noexcept {
  const u128 product = static_cast<u128>(a) * b;
  return static_cast<std::uint64_t>(product) ^ static_cast<std::uint64_t>(product >> 64);
}

[[nodiscard]] std::uint64_t load_native64(const char* p) noexcept {
  std::uint64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

[[nodiscard]] std::uint64_t load_native32(const char* p) noexcept {
  std::uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

const std::uint64_t kHashSeed = []() noexcept {
  try {
    std::random_device device;
    return (static_cast<std::uint64_t>(device()) << 32) ^ device();
  } catch (...) {
    // No entropy source: the clock and this module's load address still vary per process.
    static const int anchor = 0;
    return static_cast<std::uint64_t>(
               std::chrono::steady_clock::now().time_since_epoch().count()) ^
           reinterpret_cast<std::uintptr_t>(&anchor);
  }
}();

[[nodiscard]] std::uint32_t hash_key(std::string_view key) noexcept {
  constexpr std::uint64_t kA = 0x9e3779b97f4a7c15ULL;
  constexpr std::uint64_t kB = 0xd1b54a32d192ed03ULL;
  const char* p = key.data();
  std::size_t n = key.size();
  std::uint64_t h = kHashSeed ^ (static_cast<std::uint64_t>(n) * kB);
  while (n > 16) {
    h = fold_multiply(load_native64(p) ^ kA, load_native64(p + 8) ^ h);
    p += 16;
    n -= 16;
  }
  // The last 1..16 bytes as two (possibly overlapping) words; the length is already in h.
  std::uint64_t a = 0;
  std::uint64_t b = 0;
  if (n >= 8) {
    a = load_native64(p);
    b = load_native64(p + n - 8);
  } else if (n >= 4) {
    a = load_native32(p);
    b = load_native32(p + n - 4);
  } else if (n > 0) {
    const auto byte = [p](std::size_t i) {
      return static_cast<std::uint64_t>(static_cast<unsigned char>(p[i]));
    };
    a = (byte(0) << 16) | (byte(n / 2) << 8) | byte(n - 1);
  }
  h = fold_multiply(a ^ kA ^ h, b ^ kB);
  h = fold_multiply(h ^ kA, kB);
  return static_cast<std::uint32_t>(h ^ (h >> 32));
}

// ---------------------------------------------------------------------------------------

// Tables of a few MiB and up go on 2 MiB-aligned memory advised for transparent huge
// pages: far fewer page faults when a fresh table is first written (restore, compaction)
// and far fewer TLB misses when the hash index and slots are probed at random.
[[nodiscard]] void* allocate_table(std::size_t bytes) {
  if (bytes < kHugePage) {
    void* p = std::malloc(bytes == 0 ? 1 : bytes);
    if (p == nullptr) throw std::bad_alloc();
    return p;
  }
  const std::size_t rounded = (bytes + kHugePage - 1) & ~(kHugePage - 1);
  void* p = std::aligned_alloc(kHugePage, rounded);
  if (p == nullptr) throw std::bad_alloc();
  advise_huge_pages(p, rounded);
  return p;
}

template <typename T>
struct TableAllocator {
  using value_type = T;
  TableAllocator() = default;
  template <typename U>
  explicit TableAllocator(const TableAllocator<U>& /*other*/) noexcept {}
  [[nodiscard]] T* allocate(std::size_t n) {
    if (n > std::numeric_limits<std::size_t>::max() / sizeof(T)) throw std::bad_alloc();
    const std::size_t bytes = n * sizeof(T);
    if (bytes < kHugePage && alignof(T) > alignof(std::max_align_t)) {
      return static_cast<T*>(::operator new(bytes, std::align_val_t{alignof(T)}));
    }
    return static_cast<T*>(allocate_table(bytes));
  }
  void deallocate(T* p, std::size_t n) noexcept {
    if (n * sizeof(T) < kHugePage && alignof(T) > alignof(std::max_align_t)) {
      ::operator delete(p, std::align_val_t{alignof(T)});
      return;
    }
    std::free(p);
  }
  friend bool operator==(const TableAllocator&, const TableAllocator&) noexcept { return true; }
};

template <typename T>
using TableVector = std::vector<T, TableAllocator<T>>;

struct FreeDeleter {
  void operator()(char* p) const noexcept { std::free(p); }
};

// An entry: 16 bytes, 16-aligned, so a slot never straddles two cache lines. The key length
// carries a flag in its top bit (the entry has an expiry field); a deleted slot keeps its
// entry (its key still orders the run until the next compaction) and marks value_len.
struct alignas(16) Slot {
  const char* entry;
  std::uint32_t key_bits;
  std::uint32_t value_len;
};
static_assert(sizeof(Slot) == 16);

constexpr std::uint32_t kHasExpiry = std::uint32_t{1} << 31;
constexpr std::uint32_t kDead = std::numeric_limits<std::uint32_t>::max();

[[nodiscard]] constexpr std::uint32_t key_len(const Slot& s) noexcept {
  return s.key_bits & ~kHasExpiry;
}
[[nodiscard]] constexpr bool has_expiry(const Slot& s) noexcept {
  return (s.key_bits & kHasExpiry) != 0;
}
[[nodiscard]] constexpr std::size_t entry_size(std::size_t key, std::size_t value,
                                               bool expiring) noexcept {
  return kEntryOverhead + key + value + (expiring ? kExpirySize : 0);
}
[[nodiscard]] std::size_t entry_size(const Slot& s, std::uint32_t value_len) noexcept {
  return entry_size(key_len(s), value_len, has_expiry(s));
}
[[nodiscard]] const char* header_of(const Slot& s) noexcept {
  return s.entry + 8 + key_len(s);  // the flags byte
}
[[nodiscard]] double expiry_of(const Slot& s) noexcept {
  return has_expiry(s) ? std::bit_cast<double>(load_u64(header_of(s) + 1)) : kNeverExpires;
}

// Writes one entry at `out` (entry_size(...) bytes).
void write_entry(char* out, std::string_view key, std::string_view value, bool expiring,
                 double expires_at) noexcept {
  store_u32(out, static_cast<std::uint32_t>(key.size()));
  copy_bytes(out + 4, key.data(), key.size());
  char* header = out + 4 + key.size();
  store_u32(header, static_cast<std::uint32_t>(1 + (expiring ? kExpirySize : 0) + value.size()));
  header[4] = static_cast<char>(expiring ? kFlagExpires : 0);
  char* body = header + 5;
  if (expiring) {
    const auto bits = std::bit_cast<std::uint64_t>(expires_at);
    store_u32(body, static_cast<std::uint32_t>(bits));
    store_u32(body + 4, static_cast<std::uint32_t>(bits >> 32));
    body += kExpirySize;
  }
  copy_bytes(body, value.data(), value.size());
}

// Entry bytes, in chunks that never move (slots hold pointers), plus optionally one
// external region: a restored snapshot used in place, kept alive by its owner and never
// written to. Each chunk is at least half the size of all before it, so there are few.
class ByteArena {
 public:
  ByteArena() = default;
  ByteArena(const ByteArena&) = delete;
  ByteArena& operator=(const ByteArena&) = delete;
  ByteArena(ByteArena&&) = delete;
  ByteArena& operator=(ByteArena&&) = delete;
  ~ByteArena() = default;

  // Room for `n` contiguous bytes; strong guarantee.
  void reserve(std::size_t n) {
    if (!chunks_.empty() && chunks_.back().capacity - chunks_.back().size >= n) return;
    const std::size_t capacity = std::max({n, kMinChunk, capacity_ / 2});
    std::unique_ptr<char, FreeDeleter> data(static_cast<char*>(allocate_table(capacity)));
    chunks_.reserve(chunks_.size() + 1);
    chunks_.push_back(Chunk{std::move(data), 0, capacity});
    capacity_ += capacity;
  }
  // Requires reserve(n) beforehand: where to write the next n bytes.
  [[nodiscard]] char* take(std::size_t n) noexcept {
    Chunk& chunk = chunks_.back();
    char* out = chunk.data.get() + chunk.size;
    chunk.size += n;
    return out;
  }
  // Undoes the last take(n) (for rollback).
  void give_back(std::size_t n) noexcept { chunks_.back().size -= n; }

  void adopt_external(std::string_view bytes, std::shared_ptr<const void> owner) noexcept {
    external_ = bytes;
    external_owner_ = std::move(owner);
  }
  [[nodiscard]] bool is_external(const char* p) const noexcept {
    const auto address = reinterpret_cast<std::uintptr_t>(p);
    const auto begin = reinterpret_cast<std::uintptr_t>(external_.data());
    return address >= begin && address < begin + external_.size();
  }
  [[nodiscard]] std::shared_ptr<const void> release_external() noexcept {
    external_ = {};
    return std::move(external_owner_);
  }

  void swap(ByteArena& other) noexcept {
    chunks_.swap(other.chunks_);
    std::swap(capacity_, other.capacity_);
    std::swap(external_, other.external_);
    external_owner_.swap(other.external_owner_);
  }

 private:
  struct Chunk {
    std::unique_ptr<char, FreeDeleter> data;
    std::size_t size;
    std::size_t capacity;
  };
  std::vector<Chunk> chunks_;
  std::size_t capacity_ = 0;
  std::string_view external_;
  std::shared_ptr<const void> external_owner_;
};

// Open addressing with linear probing. A cell is (hash << 32) | (slot id + 1); 0 is empty.
// Slots are only ever appended or rebuilt wholesale, never unlinked one by one, so the
// table needs neither tombstones nor backward-shift deletion. Load stays at or below 1/2.
class HashIndex {
 public:
  HashIndex() { reset(0); }

  // An empty index sized for `expected` slots at load <= 1/2 with room to spare.
  void reset(std::size_t expected) {
    const std::size_t capacity = std::bit_ceil(std::max<std::size_t>(16, 2 * expected + 2));
    TableVector<std::uint64_t> cells(capacity, 0);
    cells_.swap(cells);
    mask_ = capacity - 1;
  }
  [[nodiscard]] bool fits(std::size_t slots) const noexcept { return 2 * slots <= cells_.size(); }

  // Doubles until `slots` fit, moving cells by their stored hash: no key is reread.
  void grow_for(std::size_t slots) {
    if (fits(slots)) return;
    HashIndex grown;
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

  void swap(HashIndex& other) noexcept {
    cells_.swap(other.cells_);
    std::swap(mask_, other.mask_);
  }

 private:
  void insert_cell(std::uint64_t cell) noexcept {
    std::size_t i = (cell >> 32) & mask_;
    while (cells_[i] != 0) i = (i + 1) & mask_;
    cells_[i] = cell;
  }

  TableVector<std::uint64_t> cells_;
  std::size_t mask_ = 0;
};

// Sorting keys without chasing a pointer per comparison: sort (8-byte big-endian chunk, id)
// pairs by chunk, then refine groups whose chunks tie on the next 8 bytes. Namespaced keys
// share long prefixes, so ties are the normal case, not an afterthought.
struct ChunkedId {
  std::uint64_t chunk;
  std::uint32_t id;
};

[[nodiscard]] std::uint64_t chunk_at(std::string_view key, std::size_t depth) noexcept {
  if (key.size() >= depth + 8) {
    std::uint64_t v;
    std::memcpy(&v, key.data() + depth, sizeof v);
    if constexpr (std::endian::native == std::endian::little) v = __builtin_bswap64(v);
    return v;
  }
  std::uint64_t chunk = 0;
  for (std::size_t i = depth; i < key.size(); ++i) {
    chunk |= static_cast<std::uint64_t>(static_cast<unsigned char>(key[i]))
             << (8 * (7 - (i - depth)));
  }
  return chunk;
}

// Stable LSD radix sort on the chunk, skipping byte positions where every item agrees
// (common prefixes cost nothing).
void radix_sort_chunks(ChunkedId* items, std::size_t n, std::vector<ChunkedId>& scratch) {
  std::array<std::array<std::size_t, 256>, 8> counts{};
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint64_t c = items[i].chunk;
    for (std::size_t b = 0; b < 8; ++b) ++counts[b][(c >> (8 * b)) & 0xff];
  }
  scratch.resize(n);
  ChunkedId* src = items;
  ChunkedId* dst = scratch.data();
  for (std::size_t b = 0; b < 8; ++b) {
    auto& count = counts[b];
    if (count[(items[0].chunk >> (8 * b)) & 0xff] == n) continue;
    std::size_t offset = 0;
    for (auto& c : count) offset += std::exchange(c, offset);
    for (std::size_t i = 0; i < n; ++i) dst[count[(src[i].chunk >> (8 * b)) & 0xff]++] = src[i];
    std::swap(src, dst);
  }
  if (src != items) std::copy(src, src + n, items);
}

// Sorts ids by key_of(id) (a string_view), unsigned bytewise: radix or std::sort on 8-byte
// chunks, then refinement of tied groups on the next chunk.
template <typename KeyOf>
void sort_ids_by_key(std::vector<std::uint32_t>& ids, KeyOf&& key_of) {
  if (ids.size() < 2) return;
  std::vector<ChunkedId> items(ids.size());
  for (std::size_t i = 0; i < ids.size(); ++i) items[i].id = ids[i];
  std::vector<ChunkedId> scratch;
  struct Range {
    std::size_t first;
    std::size_t last;
    std::size_t depth;
  };
  std::vector<Range> work{{0, items.size(), 0}};
  while (!work.empty()) {
    const Range r = work.back();
    work.pop_back();
    ChunkedId* first = items.data() + r.first;
    ChunkedId* last = items.data() + r.last;
    for (ChunkedId* p = first; p != last; ++p) {
      if (last - p > static_cast<std::ptrdiff_t>(kPipelineDistance)) {
        __builtin_prefetch(key_of(p[kPipelineDistance].id).data() + r.depth);
      }
      p->chunk = chunk_at(key_of(p->id), r.depth);
    }
    if (last - first >= static_cast<std::ptrdiff_t>(kRadixSortMin)) {
      radix_sort_chunks(first, static_cast<std::size_t>(last - first), scratch);
    } else {
      std::sort(first, last,
                [](const ChunkedId& a, const ChunkedId& b) { return a.chunk < b.chunk; });
    }
    for (ChunkedId* a = first; a != last;) {
      ChunkedId* b = a + 1;
      while (b != last && b->chunk == a->chunk) ++b;
      if (b - a > 1) {
        // Equal chunks: keys that end inside this chunk are prefixes of the longer ones,
        // and of each other, so they come first, shortest first.
        const std::size_t end = r.depth + 8;
        ChunkedId* mid = std::partition(
            a, b, [&](const ChunkedId& c) { return key_of(c.id).size() <= end; });
        std::sort(a, mid, [&](const ChunkedId& x, const ChunkedId& y) {
          return key_of(x.id).size() < key_of(y.id).size();
        });
        if (b - mid > 1) {
          work.push_back({static_cast<std::size_t>(mid - items.data()),
                          static_cast<std::size_t>(b - items.data()), end});
        }
      }
      a = b;
    }
  }
  for (std::size_t i = 0; i < ids.size(); ++i) ids[i] = items[i].id;
}

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

void advise_huge_pages(void* data, std::size_t size) noexcept {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  // Only whole 2 MiB pages inside the range can be huge; the advice is a hint, so errors
  // (a kernel without THP, say) are ignored.
  const auto begin = reinterpret_cast<std::uintptr_t>(data);
  const std::uintptr_t first = (begin + kHugePage - 1) & ~(std::uintptr_t{kHugePage} - 1);
  const std::uintptr_t last = (begin + size) & ~(std::uintptr_t{kHugePage} - 1);
  if (last > first) {
    (void)::madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
  }
#else
  (void)data;
  (void)size;
#endif
}

double wall_clock_seconds() noexcept {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// ---------------------------------------------------------------------------------------

class InMemoryStateBackend::Table {
 public:
  explicit Table(std::size_t delta_limit)
      : delta_limit_(std::max<std::size_t>(1, delta_limit)), tail_(TailOrder{this}) {}
  Table(const Table&) = delete;
  Table& operator=(const Table&) = delete;
  Table(Table&&) = delete;
  Table& operator=(Table&&) = delete;
  ~Table() = default;

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
        hashes[i % kRing] = hash_key(keys[i]);
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
    HashIndex index;
    index.build(slots_.size(), [this](std::size_t id) {
      return hash_key(key(static_cast<std::uint32_t>(id)));
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
    const std::size_t size = entry_size(k.size(), v.size(), expiring);
    const std::uint32_t bits =
        static_cast<std::uint32_t>(k.size()) | (expiring ? kHasExpiry : 0);
    if (id == kNoSlot) {
      if (slots_.size() >= kMaxSlots) {
        throw InvalidArgument("state backend: more than 2^32-2 entries");
      }
      index_.grow_for(slots_.size() + 1);
      arena_.reserve(size);
      slots_.push_back(Slot{nullptr, bits, static_cast<std::uint32_t>(v.size())});
      id = static_cast<std::uint32_t>(slots_.size() - 1);
      char* out = arena_.take(size);
      write_entry(out, k, v, expiring, expires_at);
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
      count_in(k.size(), v.size(), expiring);
      return id;
    }
    Slot& s = slots_[id];
    const bool live = s.value_len != kDead;
    // Same size, same layout, in our own memory: overwrite in place, so counters and
    // fixed-width aggregates never grow the arena. An entry that has an expiry field keeps
    // it (+inf meaning never) rather than move.
    if (live && v.size() == s.value_len && (expiring == has_expiry(s) || has_expiry(s)) &&
        !arena_.is_external(s.entry)) {
      char* header = const_cast<char*>(header_of(s));
      char* body = header + 1;
      if (has_expiry(s)) {
        const auto bits64 = std::bit_cast<std::uint64_t>(expires_at);
        store_u32(body, static_cast<std::uint32_t>(bits64));
        store_u32(body + 4, static_cast<std::uint32_t>(bits64 >> 32));
        body += kExpirySize;
      }
      copy_bytes(body, v.data(), v.size());
      return id;
    }
    arena_.reserve(size);
    if (live) {
      count_out(s);
      garbage_ += entry_size(s, s.value_len);
    } else {
      --dead_;  // revived; its old entry was counted as garbage when it was deleted
    }
    char* out = arena_.take(size);
    write_entry(out, k, v, expiring, expires_at);
    s = Slot{out, bits, static_cast<std::uint32_t>(v.size())};
    count_in(k.size(), v.size(), expiring);
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
    if (!tail_ordered_ && slots_.size() - run_ <= tail_limit()) {
      // Mostly updates after all: ordering the few new keys now is cheaper than a merge.
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
           dead_ > std::max(delta_limit_, slots_.size() / 4) ||
           garbage_ > std::max(64 * delta_limit_, stored_entry_bytes_);
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
    TableVector<Slot> slots;
    slots.reserve(stored_);
    ByteArena arena;
    arena.reserve(std::max<std::size_t>(stored_entry_bytes_, 1));
    const auto move_slot = [&](std::uint32_t id) {
      const std::string_view bytes = entry(id);
      char* out = arena.take(bytes.size());
      copy_bytes(out, bytes.data(), bytes.size());
      slots.push_back(Slot{out, slots_[id].key_bits, slots_[id].value_len});
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
    HashIndex index;
    index.build(slots.size(), [&](std::size_t id) {
      return hash_key({slots[id].entry + 4, key_len(slots[id])});
    });
    retired_.reserve(retired_.size() + 1);
    // Commit: nothing below can throw.
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
  static std::unique_ptr<Table> from_snapshot(std::string_view snapshot, std::size_t delta_limit,
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
    auto table = std::make_unique<Table>(delta_limit);
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
      if (record.key.size() > kMaxStateKeySize) {
        throw CorruptDataError("state backend snapshot: oversized key at entry " + std::to_string(n));
      }
      const std::string_view v = record.value;
      const unsigned char flags = v.empty() ? 0xff : static_cast<unsigned char>(v[0]);
      const bool expiring = (flags & kFlagExpires) != 0;
      const std::size_t value_header = expiring ? 1 + kExpirySize : 1;
      if ((flags & ~kFlagExpires) != 0 || v.size() < value_header) {
        throw CorruptDataError("state backend snapshot: malformed value header at entry " +
                               std::to_string(n));
      }
      if (expiring) {
        const double expires_at = std::bit_cast<double>(load_u64(v.data() + 1));
        if (std::isnan(expires_at) || expires_at == -kNeverExpires) {
          throw CorruptDataError("state backend snapshot: invalid expiry at entry " +
                                 std::to_string(n));
        }
      }
      const auto value_len = static_cast<std::uint32_t>(v.size() - value_header);
      const std::size_t offset = static_cast<std::size_t>(record.key.data() - snapshot.data()) - 4;
      table->slots_.push_back(Slot{base + offset,
                                   static_cast<std::uint32_t>(record.key.size()) |
                                       (expiring ? kHasExpiry : 0),
                                   value_len});
      table->count_in(record.key.size(), value_len, expiring);
    }
    reader.finish();  // nothing above is visible to anyone until this passes
    table->run_ = table->slots_.size();
    if (checkpoint_id != nullptr) *checkpoint_id = id;
    return table;
  }

 private:
  // Orders tail slot ids by key, for the std::set and for lookups by prefix.
  struct TailOrder {
    using is_transparent = void;
    const Table* table;
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
    return std::max(delta_limit_, run_ / 8);
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

  std::size_t delta_limit_;
  TableVector<Slot> slots_;
  ByteArena arena_;
  HashIndex index_;
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
};

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
    : options_(options), table_(std::make_unique<Table>(options.delta_limit)) {}

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
  const std::uint32_t hash = hash_key(key);
  const auto lock = prepared_read_lock(/*need_index=*/true, /*need_order=*/false);
  const std::uint32_t id = table_->find(key, hash);
  if (id == kNoSlot || !table_->visible(id, now)) return std::nullopt;
  return std::string(table_->value(id));
}

void InMemoryStateBackend::put(std::string_view key, std::string_view value, double expires_at) {
  check_entry(key, value);
  check_expiry(expires_at);
  const std::uint32_t hash = hash_key(key);
  const auto lock = indexed_write_lock();
  Table& t = *table_;
  t.assign(t.find(key, hash), key, hash, value, expires_at);
  bump_version();
  t.maybe_compact();
}

bool InMemoryStateBackend::erase(std::string_view key, double now) {
  check_now(now);
  const std::uint32_t hash = hash_key(key);
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
  const std::uint32_t hash = hash_key(key);
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

std::size_t InMemoryStateBackend::checkpoint(
    std::uint64_t checkpoint_id, double now,
    const std::function<char*(std::size_t)>& allocate) const {
  check_now(now);
  const auto lock = prepared_read_lock(/*need_index=*/false, /*need_order=*/true);
  const Table& t = *table_;
  const Table::CheckpointShape shape = t.checkpoint_shape(now);
  char* out = allocate(shape.bytes);
  const std::size_t written = t.write_checkpoint(out, shape.bytes, checkpoint_id, now);
  if (written != shape.bytes) throw std::logic_error("state backend: checkpoint size mismatch");
  return written;
}

std::string InMemoryStateBackend::checkpoint(std::uint64_t checkpoint_id, double now) const {
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
      Table::from_snapshot(snapshot, options_.delta_limit, std::move(keep_alive), &checkpoint_id);
  {
    const WriteGuard lock(*this);
    table_.swap(fresh);
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
