#include "core/spilling_aggregator.h"
#include "core/parallel.h"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>

#include <tbb/blocked_range.h>
#include <tbb/partitioner.h>
#include <tbb/task_arena.h>

#include "core/errors.h"
#include "core/flat_table.h"
#include "core/hash.h"
#include "core/key_traits.h"
#include "core/spill_file.h"

namespace streamstate {

namespace {

constexpr unsigned kMaxLanes = 16;
constexpr std::size_t kMaxFanout = 64;
constexpr std::size_t kMinFanout = 2;
// Below this share per partition a lane gets fewer partitions rather than tinier tables.
constexpr std::size_t kMinPartShare = 2 * 1024;
// Each lane keeps at least this much of the limit (tables plus two block buffers).
constexpr std::size_t kMinLaneBudget = 32 * 1024;
// Recursion stops splitting here and lets a partition exceed the budget instead. With 64
// hash bits remixed per level this is unreachable short of adversarial hash collisions.
constexpr unsigned kMaxDepth = 24;
// Serial below this much work (rows x lanes): a parallel_for costs more than it saves.
constexpr std::size_t kParallelThreshold = 1 << 15;
// Heap bytes a spill file name adds to the directory path ("/lane15-1234567.spill").
constexpr std::size_t kPathSuffixReserve = 48;
// How far ahead the batch loop prefetches table slots.
constexpr std::size_t kPrefetch = 16;

// Each level of repartitioning draws fresh bits from the key hash with its own seed.
[[nodiscard]] constexpr std::uint64_t level_seed(unsigned depth) noexcept {
  return nth_seed(depth);
}

// The spill file's tag for a key flavour.
template <class Keys>
inline constexpr SpillKeyType kSpillKeyType =
    std::is_same_v<Keys, Int64Keys> ? SpillKeyType::kInt64 : SpillKeyType::kBytes;

// Process-wide (per aggregator) meter: the sum over lanes, and its high-water mark.
class MemoryMeter {
 public:
  void add(std::size_t bytes) noexcept {
    const std::uint64_t now = used_.fetch_add(bytes, std::memory_order_relaxed) + bytes;
    std::uint64_t peak = peak_.load(std::memory_order_relaxed);
    while (now > peak && !peak_.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
    }
  }
  void sub(std::size_t bytes) noexcept { used_.fetch_sub(bytes, std::memory_order_relaxed); }
  [[nodiscard]] std::uint64_t used() const noexcept { return used_.load(); }
  [[nodiscard]] std::uint64_t peak() const noexcept { return peak_.load(); }

 private:
  std::atomic<std::uint64_t> used_{0};
  std::atomic<std::uint64_t> peak_{0};
};

// One lane's share of the limit. Only its lane's thread touches it.
class Budget {
 public:
  Budget(std::size_t limit, MemoryMeter& meter) noexcept : limit_(limit), meter_(meter) {}
  Budget(const Budget&) = delete;
  Budget& operator=(const Budget&) = delete;
  Budget(Budget&&) = delete;
  Budget& operator=(Budget&&) = delete;
  ~Budget() { meter_.sub(used_); }

  // used_ can pass limit_ after a forced growth (one group larger than a partition's
  // share), so both guard the subtraction.
  [[nodiscard]] bool fits(std::size_t extra) const noexcept {
    return used_ <= limit_ && extra <= limit_ - used_;
  }
  [[nodiscard]] std::size_t available() const noexcept {
    return used_ >= limit_ ? 0 : limit_ - used_;
  }
  [[nodiscard]] bool unlimited() const noexcept {
    return limit_ == std::numeric_limits<std::size_t>::max();
  }
  void charge(std::size_t bytes) noexcept {
    used_ += bytes;
    meter_.add(bytes);
  }
  void release(std::size_t bytes) noexcept {
    used_ -= bytes;
    meter_.sub(bytes);
  }

 private:
  std::size_t limit_;
  std::size_t used_ = 0;
  MemoryMeter& meter_;
};

struct LaneCounters {
  std::uint64_t spill_count = 0;
  std::uint64_t spilled_batch_count = 0;  // runs written
  std::uint64_t spilled_bytes = 0;
  std::uint64_t depth = 0;
  std::uint64_t files = 0;
};

template <class Key>
class Level;

// Everything one lane owns: its budget, its two block buffers, its counters, its top level.
template <class Key>
struct Lane {
  Lane(unsigned lane_index, std::size_t limit, MemoryMeter& meter, const std::string& spill_dir)
      : index(lane_index), budget(limit, meter), dir(spill_dir) {
    if (!budget.unlimited()) {
      // Blocks of ~1/32 of the lane's share (1 KiB .. 1 MiB): big enough for sequential
      // I/O, small enough that two of them barely dent a 64 KiB limit.
      block_bytes = std::clamp<std::size_t>(limit / 32, 1024, 1 << 20);
      write_buf.reserve(block_bytes + kSpillBlockHeaderSize + 128);
      read_buf.reserve(block_bytes + 128);
      buffer_charge = write_buf.capacity() + read_buf.capacity() + 2;
      budget.charge(buffer_charge);
    }
  }
  ~Lane() { budget.release(buffer_charge); }
  Lane(const Lane&) = delete;
  Lane& operator=(const Lane&) = delete;
  Lane(Lane&&) = delete;
  Lane& operator=(Lane&&) = delete;

  // Charges buffer growth beyond the reserve (one record larger than a block).
  void track_buffers() noexcept {
    const std::size_t now = write_buf.capacity() + read_buf.capacity() + 2;
    if (now > buffer_charge) {
      budget.charge(now - buffer_charge);
      buffer_charge = now;
    }
  }

  // Built in one exact reservation, so its heap size stays within the level's reserve.
  [[nodiscard]] std::string new_file_path() {
    const std::string name =
        "/lane" + std::to_string(index) + "-" + std::to_string(next_file++) + ".spill";
    std::string path;
    path.reserve(dir.size() + name.size());
    path.append(dir).append(name);
    return path;
  }

  unsigned index;
  Budget budget;
  std::string dir;
  pid_t owner_pid = ::getpid();
  std::size_t block_bytes = 64 * 1024;
  std::string write_buf;
  std::string read_buf;
  std::size_t buffer_charge = 0;
  std::uint64_t next_file = 0;
  LaneCounters counters;
  std::unique_ptr<Level<Key>> top;
};

// One level of partitions: the lane's top level while accumulating, or a repartitioning
// of one spilled partition while draining.
template <class Key>
class Level {
  using Keys = KeysFor<Key>;
  using Table = FlatTable<Keys, Moments>;
  using Entry = typename Table::Entry;

  struct Part {
    Table table;
    std::size_t cap = 0;      // entries reserved
    std::size_t key_cap = 0;  // arena bytes reserved (bytes keys)
    std::size_t charged = 0;  // heap bytes charged to the budget for this table
    std::string file;         // empty until the first spill
    std::uint64_t file_bytes = 0;  // written to `file` so far
  };

 public:
  Level(Lane<Key>& lane, unsigned depth, std::size_t fanout)
      : lane_(lane), depth_(depth), seed_(level_seed(depth)), parts_(fanout) {
    unsigned bits = 0;
    while ((std::size_t{1} << bits) < fanout) ++bits;
    shift_ = 64 - bits;
    // Each partition may name a spill file: reserve its path's heap bytes up front, since
    // the path is created when the budget is already full (that is why it spills).
    overhead_ = fanout * (sizeof(Part) + lane_.dir.size() + kPathSuffixReserve);
    lane_.budget.charge(overhead_);
  }

  ~Level() {
    for (Part& p : parts_) {
      lane_.budget.release(p.charged);
      if (!p.file.empty()) remove_file(p, /*report=*/false);
    }
    lane_.budget.release(overhead_);
  }
  Level(const Level&) = delete;
  Level& operator=(const Level&) = delete;
  Level(Level&&) = delete;
  Level& operator=(Level&&) = delete;

  [[nodiscard]] std::uint64_t seed() const noexcept { return seed_; }
  [[nodiscard]] std::size_t part_of_mixed(std::uint64_t mixed) const noexcept {
    return static_cast<std::size_t>(mixed >> shift_);
  }
  [[nodiscard]] std::size_t part_of(std::uint64_t hash) const noexcept {
    return part_of_mixed(hash_u64(hash, seed_));
  }

  void prefetch_slot(std::size_t part, std::uint64_t hash) const noexcept {
    parts_[part].table.prefetch_slot(hash);
  }
  void prefetch_entry(std::size_t part, std::uint64_t hash) const noexcept {
    parts_[part].table.prefetch_entry(hash);
  }

  void add_value(std::size_t part, Key key, std::uint64_t hash, double v) {
    slot_for(parts_[part], key, hash).add(v);
  }
  void add_partial(Key key, std::uint64_t hash, const Moments& m) {
    slot_for(parts_[part_of(hash)], key, hash).merge(m);
  }

  [[nodiscard]] std::size_t groups() const noexcept {
    std::size_t n = 0;
    for (const Part& p : parts_) n += p.table.size();
    return n;
  }

  // Emits every group of this level into `out`, spilling and recursing as needed, and
  // leaves the level empty with its files deleted.
  void drain(GroupColumns& out) {
    // Partitions that never spilled are complete in memory.
    for (Part& p : parts_) {
      if (p.file.empty()) {
        for (const Entry& e : p.table) out.emit(p.table.key_of(e), e.value);
        free_table(p);
      }
    }
    // The rest: write the in-memory remainder as a last run, free every table, then
    // rebuild each partition from its file alone with the whole budget.
    bool remainder = false;
    for (Part& p : parts_) {
      if (!p.file.empty()) {
        remainder = remainder || !p.table.empty();
        spill_part(p, /*event=*/false);
        free_table(p);
      }
    }
    if (remainder) ++lane_.counters.spill_count;
    for (Part& p : parts_) {
      if (p.file.empty()) continue;
      Level child(lane_, depth_ + 1, parts_.size());
      {
        SpillFileReader reader(p.file, kSpillKeyType<Keys>, lane_.read_buf, p.file_bytes);
        Key key{};
        Moments m;
        while (reader.next(key, m)) child.add_partial(key, Keys::hash(key), m);
      }
      lane_.track_buffers();
      remove_file(p, /*report=*/true);
      child.drain(out);
    }
  }

 private:
  // The partial for `key`, inserting it if new; makes room first when the table is full.
  Moments& slot_for(Part& p, Key key, std::uint64_t hash) {
    if (!has_room(p, key)) {
      const std::size_t i = p.table.find_index(key, hash);
      if (i != Table::npos) return p.table.value_at(i);
      make_room(p, key);
    }
    return p.table.find_or_insert(key, hash);
  }

  [[nodiscard]] bool has_room(const Part& p, Key key) const noexcept {
    return p.table.size() < p.cap &&
           p.table.key_bytes() + Keys::arena_bytes(key) <= p.key_cap;
  }

  void make_room(Part& p, Key key) {
    const std::size_t len = Keys::arena_bytes(key);
    if (!reshaped_) {
      if (grow(p, len, /*force=*/false)) return;
      if (depth_ >= kMaxDepth) {
        grow(p, len, /*force=*/true);
        return;
      }
      reshape();
      if (has_room(p, key)) return;
    } else {
      spill_part(p);
      if (p.charged > share_) resize(p, share_config());  // shrink after a forced growth
      if (has_room(p, key)) return;
    }
    // Only a key too large for a partition's share gets here: let this one table exceed
    // its share (documented: the limit cannot be smaller than one group).
    if (!grow(p, len, /*force=*/false)) grow(p, len, /*force=*/true);
  }

  // What the table's memory_bytes() will report for (cap, key_cap), minus the object.
  [[nodiscard]] static std::size_t table_bytes(std::size_t cap, std::size_t key_cap) {
    return Table::reserved_bytes(cap, key_cap);
  }

  // Reserves (cap, key_cap) for `p`, charging the growth before it happens: while the
  // table reallocates, old and new storage coexist, so the charge covers both.
  void reserve(Part& p, std::size_t cap, std::size_t key_cap) {
    const std::size_t predicted = table_bytes(cap, key_cap);
    lane_.budget.charge(predicted);
    try {
      p.table.reserve(cap, key_cap);
    } catch (...) {
      lane_.budget.release(predicted);
      throw;
    }
    const std::size_t actual = p.table.memory_bytes() - sizeof(Table);
    lane_.budget.release(predicted);
    lane_.budget.release(p.charged);
    lane_.budget.charge(actual);
    p.charged = actual;
    p.cap = cap;
    p.key_cap = key_cap;
  }

  // Doubling growth; false when the budget cannot take it (unless forced).
  bool grow(Part& p, std::size_t key_len, bool force) {
    std::size_t cap = p.cap;
    if (p.table.size() >= cap) cap = cap == 0 ? 12 : 2 * cap;
    std::size_t key_cap = p.key_cap;
    const std::size_t need = p.table.key_bytes() + key_len;
    if (need > key_cap) key_cap = std::max({need, 2 * key_cap, std::size_t{256}});
    if (!force && !lane_.budget.fits(table_bytes(cap, key_cap))) return false;
    reserve(p, cap, key_cap);
    return true;
  }

  void free_table(Part& p) noexcept {
    p.table.release();
    lane_.budget.release(p.charged);
    p.charged = 0;
    p.cap = 0;
    p.key_cap = 0;
  }

  struct Config {
    std::size_t cap;
    std::size_t key_cap;
  };

  // The largest equal table that `share_` bytes hold, given the keys seen so far.
  [[nodiscard]] Config share_config() const {
    const std::size_t avg_key =
        seen_keys_ == 0 ? 0 : (seen_key_bytes_ + seen_keys_ - 1) / seen_keys_;
    // Arena room per key: the average plus 1/8 slack, and 64 bytes for the odd long key.
    const std::size_t key_room = avg_key + avg_key / 8;
    const std::size_t arena_extra = avg_key == 0 ? 0 : 64;
    const std::size_t per_entry = sizeof(Entry) + key_room;
    Config best{12, 12 * key_room + arena_extra};
    for (std::size_t slots = 16; slots * sizeof(std::uint64_t) + arena_extra < share_;
         slots *= 2) {
      const std::size_t room = share_ - slots * sizeof(std::uint64_t) - arena_extra;
      std::size_t cap = std::min(slots - slots / 4, room / per_entry);
      // Large arrays are allocated in 2 MiB blocks: trim until the rounded size fits.
      while (cap > 12 && table_bytes(cap, cap * key_room + arena_extra) > share_) {
        cap -= std::max<std::size_t>(cap / 16, 1);
      }
      if (cap > best.cap) best = Config{cap, cap * key_room + arena_extra};
    }
    return best;
  }

  void resize(Part& p, Config c) {
    if (!p.table.empty()) spill_part(p);
    free_table(p);
    reserve(p, c.cap, c.key_cap);
  }

  // First overflow: spill everything, then give every partition the same fixed size, so
  // from now on each fills (and spills) on its own at nearly full capacity.
  void reshape() {
    ++lane_.counters.spill_count;
    for (Part& p : parts_) {
      observe_keys(p);
      spill_part(p, /*event=*/false);
      free_table(p);
    }
    share_ = std::max<std::size_t>(lane_.budget.available() / parts_.size(), 1);
    const Config c = share_config();
    for (Part& p : parts_) reserve(p, c.cap, c.key_cap);
    reshaped_ = true;
  }

  void observe_keys(const Part& p) noexcept {
    seen_keys_ += p.table.size();
    seen_key_bytes_ += p.table.key_bytes();
  }

  // Appends the table's partials to the partition's file as one run and empties it.
  // `event` counts it as a spill of its own (reshape and drain count once for all parts).
  void spill_part(Part& p, bool event = true) {
    if (p.table.empty()) return;
    if (p.file.empty()) {
      p.file = lane_.new_file_path();
      ++lane_.counters.files;
    }
    std::uint64_t bytes = 0;
    {
      SpillRunWriter writer(p.file, kSpillKeyType<Keys>, lane_.write_buf, lane_.block_bytes,
                            p.file_bytes);
      for (const Entry& e : p.table) writer.add(p.table.key_of(e), e.value);
      bytes = writer.finish();
    }
    lane_.track_buffers();
    LaneCounters& c = lane_.counters;
    if (event) ++c.spill_count;
    ++c.spilled_batch_count;
    c.spilled_bytes += bytes;
    p.file_bytes += bytes;
    c.depth = std::max<std::uint64_t>(c.depth, depth_ + 1);
    p.table.clear();
  }

  void remove_file(Part& p, bool report) {
    // A fork()ed child holds a copy of this aggregator but not its files: destroying the
    // copy must not delete the parent's spill files.
    if (::getpid() != lane_.owner_pid) return;
    if (::unlink(p.file.c_str()) != 0 && errno != ENOENT && report) {
      const int error = errno;
      throw SpillIoError("spill: cannot remove '" + p.file + "': " + std::strerror(error), p.file,
                         error);
    }
    p.file.clear();
    p.file_bytes = 0;
    --lane_.counters.files;
  }

  Lane<Key>& lane_;
  unsigned depth_;
  std::uint64_t seed_;
  unsigned shift_ = 63;
  std::vector<Part> parts_;
  std::size_t overhead_ = 0;
  bool reshaped_ = false;
  std::size_t share_ = 0;
  std::size_t seen_keys_ = 0;
  std::size_t seen_key_bytes_ = 0;
};

[[nodiscard]] std::size_t fanout_for(std::size_t lane_limit) noexcept {
  if (lane_limit == std::numeric_limits<std::size_t>::max()) return kMaxFanout;
  std::size_t fanout = kMinFanout;
  while (fanout < kMaxFanout && (2 * fanout) * kMinPartShare <= lane_limit / 2) fanout *= 2;
  return fanout;
}

[[nodiscard]] unsigned lane_count(const SpillingAggregatorOptions& o) {
  unsigned lanes = o.threads != 0
                       ? o.threads
                       : static_cast<unsigned>(tbb::this_task_arena::max_concurrency());
  lanes = std::clamp(lanes, 1u, kMaxLanes);
  if (o.mem_limit_bytes != 0) {
    lanes = std::min<unsigned>(
        lanes, static_cast<unsigned>(std::max<std::size_t>(o.mem_limit_bytes / kMinLaneBudget, 1)));
  }
  return lanes;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// SpillingAggregator

template <class Key>
struct SpillingAggregator<Key>::Impl {
  using Keys = KeysFor<Key>;

  explicit Impl(SpillingAggregatorOptions o) : options(std::move(o)) {
    const unsigned n = lane_count(options);
    const std::size_t lane_limit = options.mem_limit_bytes == 0
                                       ? std::numeric_limits<std::size_t>::max()
                                       : options.mem_limit_bytes / n;
    fanout = fanout_for(lane_limit);
    lanes.reserve(n);
    for (unsigned i = 0; i < n; ++i) {
      lanes.push_back(std::make_unique<Lane<Key>>(i, lane_limit, meter, options.spill_dir));
      lanes.back()->top = std::make_unique<Level<Key>>(*lanes.back(), 0, fanout);
    }
  }

  // Lane choice uses the low half of the level-0 remix; the partition within the lane
  // uses its top bits, so the two are independent.
  [[nodiscard]] unsigned lane_of(std::uint64_t mixed) const noexcept {
    return static_cast<unsigned>(((mixed & 0xffffffffULL) * lanes.size()) >> 32);
  }

  // Folds the rows of `keys` this lane owns. Two cache misses per new row (the slot, then
  // the entry it points at) are hidden by a software pipeline: a row's slot is prefetched
  // when it enters a ring of kPrefetch rows, its entry halfway through, and it is folded
  // on leaving.
  void fold_lane(unsigned l, const Key* keys, const double* values, std::size_t n) {
    Level<Key>& level = *lanes[l]->top;
    const std::uint64_t seed = level.seed();
    const bool skip_nan = options.nan_policy == NanPolicy::kSkip;
    struct Pending {
      std::size_t row;
      std::size_t part;
      std::uint64_t hash;
    };
    static_assert((kPrefetch & (kPrefetch - 1)) == 0);
    constexpr std::size_t kMask = kPrefetch - 1;
    constexpr std::size_t kHalf = kPrefetch / 2;
    Pending ring[kPrefetch];
    std::size_t head = 0;  // rows entered so far
    std::size_t done = 0;  // rows folded so far
    for (std::size_t i = 0; i < n; ++i) {
      const double v = values[i];
      if (skip_nan && std::isnan(v)) continue;
      const std::uint64_t h = Keys::hash(keys[i]);
      const std::uint64_t mixed = hash_u64(h, seed);
      if (lane_of(mixed) != l) continue;
      const std::size_t part = level.part_of_mixed(mixed);
      level.prefetch_slot(part, h);
      if (head - done == kPrefetch) {
        const Pending& due = ring[done & kMask];
        level.add_value(due.part, keys[due.row], due.hash, values[due.row]);
        ++done;
      }
      ring[head & kMask] = Pending{i, part, h};
      ++head;
      if (head - done > kHalf) {
        const Pending& mid = ring[(head - kHalf - 1) & kMask];
        level.prefetch_entry(mid.part, mid.hash);
      }
    }
    for (; done < head; ++done) {
      const Pending& due = ring[done & kMask];
      level.add_value(due.part, keys[due.row], due.hash, values[due.row]);
    }
  }

  SpillingAggregatorOptions options;
  MemoryMeter meter;  // declared before the lanes: their budgets report to it
  std::size_t fanout = kMaxFanout;
  std::vector<std::unique_ptr<Lane<Key>>> lanes;
  std::uint64_t frozen_groups = 0;
  bool drained = false;
  SpillDiagnostics final_diagnostics{};
};

template <class Key>
SpillingAggregator<Key>::SpillingAggregator(SpillingAggregatorOptions options) {
  if (options.mem_limit_bytes != 0 && options.mem_limit_bytes < kMinSpillMemLimit) {
    throw InvalidArgument("mem_limit_bytes must be at least " + std::to_string(kMinSpillMemLimit) +
                          " (64 KiB), got " + std::to_string(options.mem_limit_bytes));
  }
  if (options.spill_dir.empty()) throw InvalidArgument("spill_dir must not be empty");
  impl_ = std::make_unique<Impl>(std::move(options));
  lanes_ = static_cast<unsigned>(impl_->lanes.size());
  fanout_ = impl_->fanout;
}

template <class Key>
SpillingAggregator<Key>::~SpillingAggregator() = default;

template <class Key>
void SpillingAggregator<Key>::check_usable() const {
  if (poison_) std::rethrow_exception(poison_);
  if (!impl_) {
    throw InvalidArgument("spilling aggregator is closed (drain() or close() was called)");
  }
}

template <class Key>
void SpillingAggregator<Key>::poison() noexcept {
  poison_ = std::current_exception();
  if (impl_) release_impl();
}

template <class Key>
void SpillingAggregator<Key>::release_impl() noexcept {
  final_ = snapshot_diagnostics();
  impl_.reset();
  final_.memory_bytes = 0;
  final_.spill_files = 0;
}

template <class Key>
void SpillingAggregator<Key>::accumulate(Key key, double value) {
  const std::lock_guard lock(mutex_);
  check_usable();
  if (std::isnan(value)) {
    if (impl_->options.nan_policy == NanPolicy::kSkip) return;
    if (impl_->options.nan_policy == NanPolicy::kRaise) {
      throw InvalidArgument("value is NaN and nan_policy is 'raise'");
    }
  }
  try {
    const std::uint64_t h = KeysFor<Key>::hash(key);
    const std::uint64_t mixed = hash_u64(h, level_seed(0));
    Level<Key>& level = *impl_->lanes[impl_->lane_of(mixed)]->top;
    level.add_value(level.part_of_mixed(mixed), key, h, value);
  } catch (...) {
    poison();
    throw;
  }
}

template <class Key>
void SpillingAggregator<Key>::accumulate_batch(const Key* keys, const double* values,
                                               std::size_t n) {
  const std::lock_guard lock(mutex_);
  check_usable();
  if (n == 0) return;
  if (impl_->options.nan_policy == NanPolicy::kRaise) {
    for (std::size_t i = 0; i < n; ++i) {
      if (std::isnan(values[i])) {
        throw InvalidArgument("value at index " + std::to_string(i) +
                              " is NaN and nan_policy is 'raise' (nothing was folded)");
      }
    }
  }
  try {
    Impl& impl = *impl_;
    const auto lanes = static_cast<unsigned>(impl.lanes.size());
    if (lanes == 1 || n * lanes < kParallelThreshold) {
      for (unsigned l = 0; l < lanes; ++l) impl.fold_lane(l, keys, values, n);
    } else {
      streamstate::parallel_for(
          tbb::blocked_range<unsigned>(0, lanes, 1),
          [&](const tbb::blocked_range<unsigned>& r) {
            for (unsigned l = r.begin(); l != r.end(); ++l) impl.fold_lane(l, keys, values, n);
          },
          tbb::simple_partitioner());
    }
  } catch (...) {
    poison();
    throw;
  }
}

template <class Key>
std::vector<GroupColumns> SpillingAggregator<Key>::drain() {
  const std::lock_guard lock(mutex_);
  check_usable();
  Impl& impl = *impl_;
  impl.frozen_groups = 0;
  for (const auto& lane : impl.lanes) impl.frozen_groups += lane->top->groups();
  std::vector<GroupColumns> out(impl.lanes.size());
  try {
    streamstate::parallel_for(
        tbb::blocked_range<std::size_t>(0, impl.lanes.size(), 1),
        [&](const tbb::blocked_range<std::size_t>& r) {
          for (std::size_t l = r.begin(); l != r.end(); ++l) impl.lanes[l]->top->drain(out[l]);
        },
        tbb::simple_partitioner());
  } catch (...) {
    poison();
    throw;
  }
  impl.drained = true;
  release_impl();
  return out;
}

template <class Key>
void SpillingAggregator<Key>::close() noexcept {
  const std::lock_guard lock(mutex_);
  if (impl_) release_impl();
}

template <class Key>
SpillDiagnostics SpillingAggregator<Key>::snapshot_diagnostics() const noexcept {
  if (!impl_) return final_;
  SpillDiagnostics d;
  const Impl& impl = *impl_;
  for (const auto& lane : impl.lanes) {
    const LaneCounters& c = lane->counters;
    d.spill_count += c.spill_count;
    d.spilled_batch_count += c.spilled_batch_count;
    d.total_spilled_bytes += c.spilled_bytes;
    d.spill_depth = std::max(d.spill_depth, c.depth);
    d.spill_files += c.files;
  }
  d.in_memory_groups = impl.frozen_groups;
  if (!impl.drained) {
    d.in_memory_groups = 0;
    for (const auto& lane : impl.lanes) d.in_memory_groups += lane->top->groups();
  }
  d.peak_memory_bytes = impl.meter.peak();
  d.memory_bytes = impl.meter.used();
  return d;
}

template <class Key>
SpillDiagnostics SpillingAggregator<Key>::diagnostics() const {
  const std::lock_guard lock(mutex_);
  return snapshot_diagnostics();
}

template <class Key>
unsigned SpillingAggregator<Key>::lanes() const noexcept {
  return lanes_;
}

template <class Key>
std::size_t SpillingAggregator<Key>::fanout() const noexcept {
  return fanout_;
}

template <class Key>
bool SpillingAggregator<Key>::closed() const noexcept {
  const std::lock_guard lock(mutex_);
  return !impl_;
}

template class SpillingAggregator<std::int64_t>;
template class SpillingAggregator<std::string_view>;

}  // namespace streamstate
