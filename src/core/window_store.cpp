#include "core/window_store.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <limits>
#include <optional>
#include <thread>
#include <utility>

#include "core/byte_io.h"
#include "core/errors.h"
#include "core/partition_aggregator.h"
#include "core/record_codec.h"
#include "core/snapshot_records.h"

namespace streamstate {
namespace {

// Snapshot layout inside the record container (kind kWindowStore):
//   "streamstate.window_store": u32 layout version, u32 num_partitions, u8 key type,
//        u8 window kind, i64 size, i64 step, i64 gap, i64 closed_through,
//        u32 named columns (0: one unnamed column), each u32 length + name bytes
//   "window" + u32 partition + i64 start (tumbling, hopping; any number of chunks a
//        window): u32 n, n x (key, width Moments)
//   "sessions" + u32 partition (session; any number of chunks): u32 n, n x (key, u32 k,
//        k x (i64 start, i64 end, width Moments)), k >= 1, starts ascending
// Delta layout (kind kWindowStoreDelta): the header "streamstate.window_store.delta" has
// u32 parent identity and u64 sequence after closed_through; "window" records replace the
// window whole; "removed" + u32 partition: u32 n, n x i64 start (windows the parent held,
// emitted since); "sessions" records replace each key's list (k = 0: none left); "reset" +
// u32 partition (empty, before that partition's "sessions"): the reader empties the
// partition's sessions first (the writer rebuilt its table and lists every key).
// A key is 8 bytes LE for int64 keys, u32 length + bytes for bytes keys.
constexpr std::string_view kHeaderKey = "streamstate.window_store";
constexpr std::string_view kDeltaHeaderKey = "streamstate.window_store.delta";
constexpr std::string_view kWindowPrefix = "window";
constexpr std::string_view kRemovedPrefix = "removed";
constexpr std::string_view kSessionsPrefix = "sessions";
constexpr std::string_view kResetPrefix = "reset";
constexpr std::uint32_t kLayoutVersion = 1;
constexpr std::uint32_t kDeltaLayoutVersion = 1;
constexpr std::uint32_t kMaxPartitions = 65536;
constexpr std::size_t kChunkEntries = 1 << 16;
// An event is in size / step hopping windows; beyond this a fold would be a denial of service.
constexpr std::int64_t kMaxWindowsPerEvent = 4096;
// Session keys without sessions are dropped once they outnumber the live ones and this.
constexpr std::size_t kMinDeadKeys = 64;
// Emitted windows a partition keeps (emptied) for its next new ones: a few more than the
// windows a barrier usually closes.
constexpr std::size_t kSpareWindows = 4;
// Below this many rows emit_partitions() writes every partition on the calling thread.
constexpr std::size_t kParallelEmitRows = 1 << 15;

__extension__ typedef __int128 i128;  // NOLINT: GCC/Clang extension, pedantic-safe

constexpr std::int64_t kMinTime = std::numeric_limits<std::int64_t>::min();
constexpr std::int64_t kMaxTime = std::numeric_limits<std::int64_t>::max();

// floor(a / b) for b > 0 (C++ division truncates toward zero).
[[nodiscard]] constexpr i128 floor_div(i128 a, i128 b) noexcept {
  const i128 q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

std::string decimal(i128 v) {
  if (v >= kMinTime && v <= kMaxTime) return std::to_string(static_cast<std::int64_t>(v));
  const bool negative = v < 0;
  std::string digits;
  do {
    const auto digit = static_cast<int>(v % 10);
    digits.push_back(static_cast<char>('0' + (negative ? -digit : digit)));
    v /= 10;
  } while (v != 0);
  if (negative) digits.push_back('-');
  return {digits.rbegin(), digits.rend()};
}

// Which snapshot format found the damage, leading every CorruptDataError it raises.
constexpr std::string_view kCodec = "window store snapshot";

[[noreturn]] void corrupt(const std::string& what) {
  throw CorruptDataError(std::string(kCodec) + ": " + what);
}

std::string window_key(std::uint32_t pid, std::int64_t start) {
  std::string key = partition_record_name(kWindowPrefix, pid);
  put_u64(key, static_cast<std::uint64_t>(start));
  return key;
}

std::optional<std::uint32_t> partition_of(std::string_view key, std::string_view prefix,
                                          std::uint32_t np, std::size_t suffix = 0,
                                          std::string_view* rest = nullptr) {
  return partition_of_record(key, prefix, np, kCodec, suffix, rest);
}

std::string describe(const WindowSpec& spec) {
  switch (spec.kind) {
    case WindowKind::kTumbling:
      return "tumbling windows of size " + std::to_string(spec.size);
    case WindowKind::kHopping:
      return "hopping windows of size " + std::to_string(spec.size) + " and step " +
             std::to_string(spec.step);
    case WindowKind::kSession:
      return "session windows of gap " + std::to_string(spec.gap);
  }
  return "unknown windows";
}

// Every partition's mutex, in ascending order, for as long as this lives.
class AllLocks {
 public:
  template <class Partitions>
  explicit AllLocks(const Partitions& partitions) {
    locks_.reserve(partitions.size());
    for (const auto& p : partitions) locks_.emplace_back(p->mutex);
  }

 private:
  std::vector<std::unique_lock<std::mutex>> locks_;
};

}  // namespace

std::string_view window_kind_name(WindowKind kind) noexcept {
  switch (kind) {
    case WindowKind::kTumbling:
      return "tumbling";
    case WindowKind::kHopping:
      return "hopping";
    case WindowKind::kSession:
      return "session";
  }
  return "unknown";
}

void WindowSpec::validate() const {
  switch (kind) {
    case WindowKind::kTumbling:
      if (size <= 0) throw InvalidArgument("tumbling windows need size > 0");
      if (step != 0 && step != size) throw InvalidArgument("tumbling windows take no step");
      if (gap != 0) throw InvalidArgument("tumbling windows take no gap");
      return;
    case WindowKind::kHopping:
      if (size <= 0 || step <= 0) throw InvalidArgument("hopping windows need size > 0 and step > 0");
      if (step > size) {
        throw InvalidArgument("hopping windows need step <= size, got size " +
                              std::to_string(size) + " and step " + std::to_string(step));
      }
      if (size % step != 0) {
        throw InvalidArgument("hopping windows need size to be a multiple of step, got size " +
                              std::to_string(size) + " and step " + std::to_string(step));
      }
      if (size / step > kMaxWindowsPerEvent) {
        throw InvalidArgument("hopping windows of size / step above " +
                              std::to_string(kMaxWindowsPerEvent) + " (each event would be in " +
                              std::to_string(size / step) + " windows)");
      }
      if (gap != 0) throw InvalidArgument("hopping windows take no gap");
      return;
    case WindowKind::kSession:
      if (gap <= 0) throw InvalidArgument("session windows need gap > 0");
      if (size != 0 || step != 0) throw InvalidArgument("session windows take no size or step");
      return;
  }
  throw InvalidArgument("unknown window kind");
}

// A row of the emission: where its partials are, until the rows are written out.
template <class K>
struct WindowedAggregateStore<K>::RowRef {
  std::int64_t end;
  std::int64_t start;
  View key;
  std::uint32_t partition;
  const Moments* first;
  const Moments* more;  // columns 1..
};

template <class K>
WindowedAggregateStore<K>::WindowedAggregateStore(std::uint32_t num_partitions, WindowSpec spec,
                                                  NanPolicy policy,
                                                  std::vector<std::string> columns)
    : spec_(spec),
      policy_(policy),
      columns_(std::move(columns)),
      width_(std::max<std::size_t>(1, columns_.size())),
      closed_through_(kMinTime) {
  if (num_partitions == 0 || num_partitions > kMaxPartitions) {
    throw InvalidArgument("num_partitions must be between 1 and 65536, got " +
                          std::to_string(num_partitions));
  }
  spec_.validate();
  if (spec_.kind == WindowKind::kTumbling) spec_.step = spec_.size;
  if (columns_.size() > kMaxColumns) {
    throw InvalidArgument("at most " + std::to_string(kMaxColumns) + " value columns, got " +
                          std::to_string(columns_.size()));
  }
  for (std::size_t c = 0; c < columns_.size(); ++c) {
    if (columns_[c].empty()) throw InvalidArgument("a value column name is empty");
    if (std::find(columns_.begin(), columns_.begin() + static_cast<std::ptrdiff_t>(c),
                  columns_[c]) != columns_.begin() + static_cast<std::ptrdiff_t>(c)) {
      throw InvalidArgument("value column '" + columns_[c] + "' is named twice");
    }
  }
  partitions_.reserve(num_partitions);
  for (std::uint32_t i = 0; i < num_partitions; ++i) {
    partitions_.push_back(std::make_unique<Partition>());
    partitions_.back()->spare.reserve(kSpareWindows);  // recycle() never allocates
  }
}

template <class K>
void WindowedAggregateStore<K>::check_partition(std::uint32_t partition_id) const {
  if (partition_id >= partitions_.size()) {
    throw InvalidArgument("partition_id " + std::to_string(partition_id) + " out of range [0, " +
                          std::to_string(partitions_.size()) + ")");
  }
}

template <class K>
void WindowedAggregateStore<K>::check_times(const std::int64_t* times, std::size_t n) const {
  if (n == 0) return;
  // Window bounds grow with t, so the earliest and the latest time decide (found by value
  // in one vectorisable pass; the row is looked up only to name it).
  std::int64_t lo = times[0];
  std::int64_t hi = times[0];
  for (std::size_t i = 1; i < n; ++i) {
    lo = std::min(lo, times[i]);
    hi = std::max(hi, times[i]);
  }
  const auto refuse = [&](std::int64_t t, i128 start, i128 end) {
    const std::size_t i = static_cast<std::size_t>(std::find(times, times + n, t) - times);
    throw InvalidArgument("times[" + std::to_string(i) + "] = " + std::to_string(t) +
                          ": its window [" + decimal(start) + ", " + decimal(end) +
                          ") does not fit in int64 milliseconds");
  };
  if (sessions_kind()) {
    const i128 end = static_cast<i128>(hi) + spec_.gap;
    if (end > kMaxTime) refuse(hi, hi, end);
    return;
  }
  const i128 last_of_hi = floor_div(hi, spec_.step) * spec_.step;
  if (last_of_hi + spec_.size > kMaxTime) refuse(hi, last_of_hi, last_of_hi + spec_.size);
  const i128 first_of_lo = floor_div(lo, spec_.step) * spec_.step - (spec_.size - spec_.step);
  if (first_of_lo < kMinTime) refuse(lo, first_of_lo, first_of_lo + spec_.size);
}

template <class K>
bool WindowedAggregateStore<K>::skipped(const double* row) const noexcept {
  if (policy_ != NanPolicy::kSkip) return false;
  for (std::size_t c = 0; c < width_; ++c) {
    if (!std::isnan(row[c])) return false;
  }
  return true;
}

template <class K>
void WindowedAggregateStore<K>::add_row(Moments& first, Moments* more,
                                        const double* row) const noexcept {
  const bool skip = policy_ == NanPolicy::kSkip;
  for (std::size_t c = 0; c < width_; ++c) {
    const double x = row[c];
    if (std::isnan(x)) {
      if (skip) continue;
      (c == 0 ? first : more[c - 1]).add(x);
    } else {
      add_number(c == 0 ? first : more[c - 1], x);
    }
  }
}

template <class K>
std::size_t WindowedAggregateStore<K>::fold(std::uint32_t partition_id, const View* keys,
                                            const std::int64_t* times, const double* values,
                                            std::size_t n, std::int64_t watermark) {
  check_partition(partition_id);
  if (policy_ == NanPolicy::kRaise && any_nan(values, n * width_)) {
    for (std::size_t i = 0; i < n * width_; ++i) {
      if (std::isnan(values[i])) {
        throw InvalidArgument("NaN value at row " + std::to_string(i / width_) + ", column " +
                              std::to_string(i % width_) +
                              " (nan_policy='raise'); nothing from this batch was folded");
      }
    }
  }
  check_times(times, n);
  Partition& p = *partitions_[partition_id];
  const std::lock_guard<std::mutex> lock(p.mutex);
  const std::int64_t closed = std::max(watermark, closed_through_);
  std::size_t late = 0;
  if (sessions_kind()) {
    fold_sessions(p, keys, times, values, n, closed, late);
  } else {
    fold_windows(p, keys, times, values, n, closed, late);
  }
  return late;
}

template <class K>
void WindowedAggregateStore<K>::fold_windows(Partition& p, const View* keys,
                                             const std::int64_t* times, const double* values,
                                             std::size_t n, std::int64_t closed,
                                             std::size_t& late) {
  const std::int64_t size = spec_.size;
  const std::int64_t step = spec_.step;
  const auto per_row = static_cast<std::size_t>(size / step);
  // Runs of consecutive rows whose latest window starts alike (most rows of a batch in
  // time order share it): their windows are looked up once a run, and each window folds
  // the run in one prefetching pass.
  for (std::size_t a = 0; a < n;) {
    // check_times made every bound below fit in int64, last + step and last + size included.
    const std::int64_t q = times[a] / step;
    const std::int64_t last = (times[a] % step < 0 ? q - 1 : q) * step;
    std::size_t b = a + 1;
    while (b < n && times[b] >= last && times[b] < last + step) ++b;
    if (last + size <= closed) {  // the latest-ending window holding them is closed: all are
      late += b - a;
      a = b;
      continue;
    }
    const double* run = values + a * width_;
    bool any = policy_ != NanPolicy::kSkip;
    for (std::size_t i = 0; !any && i < b - a; ++i) any = !skipped(run + i * width_);
    for (std::size_t k = 0; any && k < per_row; ++k) {
      const std::int64_t start = last - static_cast<std::int64_t>(k) * step;
      if (start + size <= closed) break;  // earlier starts end earlier: closed too
      fold_run(p, window_at(p, start), keys + a, run, b - a);
    }
    a = b;
  }
}

template <class K>
void WindowedAggregateStore<K>::fold_run(Partition& p, Window& w, const View* keys,
                                         const double* values, std::size_t n) {
  const std::size_t extra = width_ - 1;
  // Each row's slot is fetched kAhead rows before its lookup and its entry half way, so a
  // window bigger than the cache does not wait on every row's misses.
  constexpr std::size_t kAhead = 8;
  std::uint64_t ring[kAhead];
  for (std::size_t j = 0; j < std::min(n, kAhead); ++j) {
    ring[j] = K::hash(keys[j]);
    w.table.prefetch_slot(ring[j]);
  }
  w.dirty = true;
  for (std::size_t i = 0; i < n; ++i) {
    const std::uint64_t hash = ring[i % kAhead];
    if (i + kAhead < n) {
      ring[i % kAhead] = K::hash(keys[i + kAhead]);
      w.table.prefetch_slot(ring[i % kAhead]);
    }
    if (i + kAhead / 2 < n) w.table.prefetch_entry(ring[(i + kAhead / 2) % kAhead]);
    const double* row = values + i * width_;
    if (skipped(row)) continue;
    const auto [idx, inserted] = w.table.emplace(keys[i], hash);
    if (inserted) {
      if (extra > 0) w.more.resize((idx + 1) * extra);
      ++p.open;
    }
    add_row(w.table.value_at(idx), extra > 0 ? w.more.data() + idx * extra : nullptr, row);
  }
}

template <class K>
void WindowedAggregateStore<K>::mark(Partition& p, std::size_t index) {
  KeySessions& ks = p.sessions.value_at(index);
  if (ks.dirty) return;
  ks.dirty = true;
  p.dirty_keys.push_back(index);
}

template <class K>
void WindowedAggregateStore<K>::fold_sessions(Partition& p, const View* keys,
                                              const std::int64_t* times, const double* values,
                                              std::size_t n, std::int64_t closed,
                                              std::size_t& late) {
  const std::size_t w = width_;
  for (std::size_t i = 0; i < n; ++i) {
    const std::int64_t t = times[i];
    const std::int64_t end = t + spec_.gap;  // check_times: fits
    if (end <= closed) {
      ++late;
      continue;
    }
    const double* row = values + i * w;
    if (skipped(row)) continue;
    const auto [idx, inserted] = p.sessions.emplace(keys[i], K::hash(keys[i]));
    KeySessions& ks = p.sessions.value_at(idx);
    if (!inserted && ks.spans.empty()) --p.dead_keys;
    mark(p, idx);
    // Open sessions overlapping [t, end): they and the event become one session. Open
    // sessions never overlap each other; closed ones are left alone (already final).
    const auto joins = [&](const Session& s) { return s.end > closed && s.start < end && t < s.end; };
    std::size_t first = ks.spans.size();
    std::size_t hits = 0;
    for (std::size_t j = 0; j < ks.spans.size(); ++j) {
      if (joins(ks.spans[j])) {
        if (hits++ == 0) first = j;
      }
    }
    if (hits == 1 && t >= ks.spans[first].start) {  // inside or extending one session
      ks.spans[first].end = std::max(ks.spans[first].end, end);
      add_row(ks.partials[first * w], ks.partials.data() + first * w + 1, row);
      continue;
    }
    std::vector<Moments>& merged = p.scratch;
    merged.assign(w, Moments{});
    Session span{t, end};
    std::size_t keep = 0;
    for (std::size_t j = 0; j < ks.spans.size(); ++j) {
      if (joins(ks.spans[j])) {
        span.start = std::min(span.start, ks.spans[j].start);
        span.end = std::max(span.end, ks.spans[j].end);
        for (std::size_t c = 0; c < w; ++c) merged[c].merge(ks.partials[j * w + c]);
        continue;
      }
      if (keep != j) {
        ks.spans[keep] = ks.spans[j];
        std::copy_n(ks.partials.begin() + static_cast<std::ptrdiff_t>(j * w), w,
                    ks.partials.begin() + static_cast<std::ptrdiff_t>(keep * w));
      }
      ++keep;
    }
    add_row(merged[0], merged.data() + 1, row);
    ks.spans.resize(keep);
    ks.partials.resize(keep * w);
    const auto at = static_cast<std::size_t>(
        std::upper_bound(ks.spans.begin(), ks.spans.end(), span.start,
                         [](std::int64_t s, const Session& x) { return s < x.start; }) -
        ks.spans.begin());
    ks.spans.insert(ks.spans.begin() + static_cast<std::ptrdiff_t>(at), span);
    ks.partials.insert(ks.partials.begin() + static_cast<std::ptrdiff_t>(at * w), merged.begin(),
                       merged.end());
    p.open = p.open + 1 - hits;
  }
}

template <class K>
WindowRows<K> WindowedAggregateStore<K>::emit(std::int64_t watermark) {
  return take(watermark, false);
}

template <class K>
WindowRows<K> WindowedAggregateStore<K>::emit_all() {
  return take(kMaxTime, true);
}

template <class K>
std::vector<WindowRows<K>> WindowedAggregateStore<K>::emit_partitions(std::int64_t watermark) {
  return take_partitions(watermark, false);
}

template <class K>
std::vector<WindowRows<K>> WindowedAggregateStore<K>::emit_all_partitions() {
  return take_partitions(kMaxTime, true);
}

template <class K>
typename WindowedAggregateStore<K>::Window& WindowedAggregateStore<K>::window_at(
    Partition& p, std::int64_t start) {
  const auto it = p.windows.lower_bound(start);
  if (it != p.windows.end() && it->first == start) return it->second;
  if (p.spare.empty()) return p.windows.try_emplace(it, start)->second;
  typename Windows::node_type node = std::move(p.spare.back());
  p.spare.pop_back();
  node.key() = start;
  return p.windows.insert(it, std::move(node))->second;
}

template <class K>
void WindowedAggregateStore<K>::recycle(Partition& p,
                                        typename Windows::node_type&& node) noexcept {
  if (p.spare.size() >= std::min(kSpareWindows, p.spare.capacity())) return;  // freed
  Window& w = node.mapped();
  w.table.clear();
  w.more.clear();
  w.dirty = true;
  w.captured = false;
  p.spare.push_back(std::move(node));  // within capacity: no allocation
}

template <class K>
WindowRows<K> WindowedAggregateStore<K>::take(std::int64_t watermark, bool everything) {
  const AllLocks locks(partitions_);
  std::vector<RowRef> rows;
  WindowRows<K> out;
  if (!sessions_kind()) {
    // Emitted windows stay alive (their keys and partials are what the rows point at)
    // until the rows are written, then become spares or are freed.
    std::vector<std::pair<std::uint32_t, typename Windows::node_type>> popped;
    std::size_t total = 0;
    for (std::uint32_t pid = 0; pid < num_partitions(); ++pid) {
      Partition& p = *partitions_[pid];
      while (!p.windows.empty()) {
        const auto it = p.windows.begin();
        // start + size was checked when the window was made.
        if (!everything && it->first + spec_.size > watermark) break;
        popped.emplace_back(pid, p.windows.extract(it));
        const Window& w = popped.back().second.mapped();
        total += w.table.size();
        p.open -= w.table.size();
        if (w.captured) p.removed.push_back(popped.back().second.key());
      }
    }
    // Window by window (every partition's part of one window together), so each sort
    // and merge works on one window's rows, which stay in cache.
    std::stable_sort(popped.begin(), popped.end(), [](const auto& a, const auto& b) {
      return a.second.key() < b.second.key();
    });
    allocate_rows(out, total);
    const std::size_t extra = width_ - 1;
    for (std::size_t first = 0; first < popped.size();) {
      const std::int64_t start = popped[first].second.key();
      rows.clear();
      std::size_t last = first;
      for (; last < popped.size() && popped[last].second.key() == start; ++last) {
        const Window& w = popped[last].second.mapped();
        for (std::size_t i = 0; i < w.table.size(); ++i) {
          rows.push_back(RowRef{start + spec_.size, start, w.table.key_at(i), popped[last].first,
                                &w.table.value_at(i),
                                extra > 0 ? w.more.data() + i * extra : nullptr});
        }
      }
      append_rows(out, rows);
      first = last;
    }
    finish_rows(out);
    for (auto& [pid, node] : popped) recycle(*partitions_[pid], std::move(node));
  } else {
    for (std::uint32_t pid = 0; pid < num_partitions(); ++pid) {
      closing_sessions(pid, watermark, everything, rows);
    }
    allocate_rows(out, rows.size());
    append_rows(out, rows);
    finish_rows(out);
    for (auto& part : partitions_) drop_sessions(*part, watermark, everything);
  }
  if (!everything && watermark > closed_through_) closed_through_ = watermark;
  return out;
}

template <class K>
void WindowedAggregateStore<K>::closing_sessions(std::uint32_t pid, std::int64_t watermark,
                                                 bool everything,
                                                 std::vector<RowRef>& rows) const {
  const Partition& p = *partitions_[pid];
  for (std::size_t i = 0; i < p.sessions.size(); ++i) {
    const KeySessions& ks = p.sessions.value_at(i);
    for (std::size_t j = 0; j < ks.spans.size(); ++j) {
      if (!everything && ks.spans[j].end > watermark) continue;
      const Moments* first = ks.partials.data() + j * width_;
      rows.push_back(RowRef{ks.spans[j].end, ks.spans[j].start, p.sessions.key_at(i), pid,
                            first, first + 1});
    }
  }
}

template <class K>
void WindowedAggregateStore<K>::drop_sessions(Partition& p, std::int64_t watermark,
                                              bool everything) {
  for (std::size_t i = 0; i < p.sessions.size(); ++i) {
    KeySessions& ks = p.sessions.value_at(i);
    if (ks.spans.empty()) continue;
    std::size_t keep = 0;
    for (std::size_t j = 0; j < ks.spans.size(); ++j) {
      if (everything || ks.spans[j].end <= watermark) continue;
      if (keep != j) {
        ks.spans[keep] = ks.spans[j];
        std::copy_n(ks.partials.begin() + static_cast<std::ptrdiff_t>(j * width_), width_,
                    ks.partials.begin() + static_cast<std::ptrdiff_t>(keep * width_));
      }
      ++keep;
    }
    if (keep == ks.spans.size()) continue;
    p.open -= ks.spans.size() - keep;
    ks.spans.resize(keep);
    ks.partials.resize(keep * width_);
    if (keep == 0) {
      std::vector<Session>().swap(ks.spans);
      std::vector<Moments>().swap(ks.partials);
      ++p.dead_keys;
    }
    mark(p, i);
  }
  compact_sessions(p);
}

template <class View>
[[nodiscard]] std::size_t view_bytes(const View& key) noexcept {
  if constexpr (requires { key.size(); }) {
    return key.size();
  } else {
    return 0;
  }
}

// Key bytes (for bytes keys) reserved too, so appending the rows cannot allocate.
template <class Column>
void reserve_key_column(Column& column, std::size_t rows, std::size_t key_bytes) {
  column.reserve(rows);
  if constexpr (requires { column.bytes.reserve(key_bytes); }) column.bytes.reserve(key_bytes);
}

template <class K>
void WindowedAggregateStore<K>::reserve_partition(const Partition& p, WindowRows<K>& out,
                                                  std::int64_t watermark,
                                                  bool everything) const {
  std::size_t rows = 0;
  std::size_t key_bytes = 0;
  if (!sessions_kind()) {
    for (const auto& [start, w] : p.windows) {
      if (!everything && start + spec_.size > watermark) break;
      rows += w.table.size();
      key_bytes += w.table.key_bytes();
    }
  } else {
    for (std::size_t i = 0; i < p.sessions.size(); ++i) {
      const KeySessions& ks = p.sessions.value_at(i);
      std::size_t closing = 0;
      for (const Session& span : ks.spans) closing += everything || span.end <= watermark;
      rows += closing;
      key_bytes += closing * view_bytes(p.sessions.key_at(i));
    }
  }
  reserve_key_column(out.keys, rows, key_bytes);
  allocate_rows(out, rows);
}

template <class K>
void WindowedAggregateStore<K>::push_row(WindowRows<K>& out, View key, std::int64_t start,
                                         std::int64_t end, const Moments& first,
                                         const Moments* more) const noexcept {
  const std::size_t g = out.starts.size();
  out.keys.push_back(key);  // reserved: no allocation
  out.starts.push_back(start);
  out.ends.push_back(end);
  out.columns[0].set(g, first);
  for (std::size_t c = 1; c < width_; ++c) out.columns[c].set(g, more[c - 1]);
}

template <class K>
void WindowedAggregateStore<K>::take_partition(Partition& p, WindowRows<K>& out,
                                               std::int64_t watermark,
                                               bool everything) const noexcept {
  const std::size_t extra = width_ - 1;
  while (!p.windows.empty()) {
    const auto it = p.windows.begin();
    const std::int64_t start = it->first;
    if (!everything && start + spec_.size > watermark) break;
    const Window& w = it->second;
    // Entry order: the partials are read in memory order.
    for (std::size_t i = 0; i < w.table.size(); ++i) {
      push_row(out, w.table.key_at(i), start, start + spec_.size, w.table.value_at(i),
               extra > 0 ? w.more.data() + i * extra : nullptr);
    }
    p.open -= w.table.size();
    if (w.captured) p.removed.push_back(start);  // reserved by the caller
    recycle(p, p.windows.extract(it));
  }
  finish_rows(out);
}

template <class K>
std::vector<WindowRows<K>> WindowedAggregateStore<K>::take_partitions(std::int64_t watermark,
                                                                      bool everything) {
  const AllLocks locks(partitions_);
  const std::uint32_t np = num_partitions();
  std::vector<WindowRows<K>> out(np);
  std::size_t total = 0;
  // Everything that allocates first, so a failure leaves the state as it was.
  for (std::uint32_t pid = 0; pid < np; ++pid) {
    Partition& p = *partitions_[pid];
    reserve_partition(p, out[pid], watermark, everything);
    total += out[pid].starts.capacity();
    p.removed.reserve(p.removed.size() + p.windows.size());
  }
  if (sessions_kind()) {
    // A scan of every key, then a sort: a session table's key order is not kept by
    // captures (they list keys sorted), so a partition's rows are sorted as emit()'s are,
    // to be the same after a restore.
    std::vector<RowRef> rows;
    for (std::uint32_t pid = 0; pid < np; ++pid) {
      rows.clear();
      closing_sessions(pid, watermark, everything, rows);
      sort_rows(rows);
      for (const RowRef& r : rows) push_row(out[pid], r.key, r.start, r.end, *r.first, r.more);
      finish_rows(out[pid]);
    }
    for (auto& part : partitions_) drop_sessions(*part, watermark, everything);
  } else {
    // The partitions' rows are written by several threads, each partition by one; the
    // caller holds every partition's lock for them, and joining orders their writes.
    std::atomic<std::uint32_t> next{0};
    const auto work = [&]() noexcept {
      for (std::uint32_t pid = next++; pid < np; pid = next++) {
        take_partition(*partitions_[pid], out[pid], watermark, everything);
      }
    };
    std::vector<std::thread> helpers;
    if (total >= kParallelEmitRows) {
      const std::size_t wanted =
          std::min<std::size_t>({np, kEmitThreads, std::max(1U, std::thread::hardware_concurrency())});
      try {
        helpers.reserve(wanted - 1);
        for (std::size_t t = 1; t < wanted; ++t) helpers.emplace_back(work);
      } catch (...) {  // no thread to be had: the calling one does the rest
      }
    }
    work();
    for (std::thread& helper : helpers) helper.join();
  }
  if (!everything && watermark > closed_through_) closed_through_ = watermark;
  return out;
}

template <class K>
void WindowedAggregateStore<K>::allocate_rows(WindowRows<K>& out, std::size_t rows) const {
  out.keys.reserve(rows);
  out.starts.reserve(rows);
  out.ends.reserve(rows);
  out.columns.resize(width_);
  for (StatArrays& column : out.columns) column.allocate(rows);
}

template <class K>
void WindowedAggregateStore<K>::sort_rows(std::vector<RowRef>& rows) {
  std::sort(rows.begin(), rows.end(), [](const RowRef& a, const RowRef& b) {
    if (a.end != b.end) return a.end < b.end;
    if (a.start != b.start) return a.start < b.start;
    if (a.key != b.key) return K::less(a.key, b.key);
    return a.partition < b.partition;
  });
}

template <class K>
void WindowedAggregateStore<K>::append_rows(WindowRows<K>& out, std::vector<RowRef>& rows) const {
  sort_rows(rows);
  const auto same = [](const RowRef& a, const RowRef& b) {
    return a.end == b.end && a.start == b.start && a.key == b.key;
  };
  // Sorted by key, the rows visit their partials in no memory order: fetched a few rows
  // ahead, so a window bigger than the cache does not wait on every row's miss.
  constexpr std::size_t kAhead = 8;
  for (std::size_t i = 0; i < rows.size();) {
    if (i + kAhead < rows.size()) flat_detail::prefetch(rows[i + kAhead].first);
    std::size_t j = i + 1;
    while (j < rows.size() && same(rows[i], rows[j])) ++j;
    const std::size_t g = out.starts.size();
    out.keys.push_back(rows[i].key);
    out.starts.push_back(rows[i].start);
    out.ends.push_back(rows[i].end);
    for (std::size_t c = 0; c < width_; ++c) {
      const auto partial = [&](std::size_t r) -> const Moments& {
        return c == 0 ? *rows[r].first : rows[r].more[c - 1];
      };
      if (j == i + 1) {
        out.columns[c].set(g, partial(i));
        continue;
      }
      // A key folded for one window by several partitions: merged in partition order.
      Moments m;
      for (std::size_t r = i; r < j; ++r) m.merge(partial(r));
      out.columns[c].set(g, m);
    }
    i = j;
  }
}

template <class K>
void WindowedAggregateStore<K>::finish_rows(WindowRows<K>& out) noexcept {
  for (StatArrays& column : out.columns) column.size = out.starts.size();
}

template <class K>
void WindowedAggregateStore<K>::compact_sessions(Partition& p) {
  const std::size_t live = p.sessions.size() - p.dead_keys;
  if (p.dead_keys < kMinDeadKeys || p.dead_keys <= live) return;
  SessionTable fresh;
  if (live > 0) {
    fresh.reserve(live);
    for (std::size_t i = 0; i < p.sessions.size(); ++i) {
      KeySessions& ks = p.sessions.value_at(i);
      if (ks.spans.empty()) continue;
      const std::size_t idx = fresh.emplace(p.sessions.key_at(i), p.sessions.hash_at(i)).first;
      KeySessions& moved = fresh.value_at(idx);
      moved.spans = std::move(ks.spans);
      moved.partials = std::move(ks.partials);
    }
  }
  // Indices changed: the next delta lists every key instead (see Partition::rewritten).
  p.sessions = std::move(fresh);
  p.dirty_keys.clear();
  p.dead_keys = 0;
  p.rewritten = true;
}

template <class K>
void WindowedAggregateStore<K>::recount(Partition& p) noexcept {
  p.open = 0;
  p.dead_keys = 0;
  for (const auto& [start, w] : p.windows) p.open += w.table.size();
  for (std::size_t i = 0; i < p.sessions.size(); ++i) {
    const std::size_t n = p.sessions.value_at(i).spans.size();
    p.open += n;
    if (n == 0) ++p.dead_keys;
  }
}

template <class K>
std::size_t WindowedAggregateStore<K>::open_windows() const {
  std::size_t total = 0;
  for (const auto& p : partitions_) {
    const std::lock_guard<std::mutex> lock(p->mutex);
    total += p->open;
  }
  return total;
}

template <class K>
std::size_t WindowedAggregateStore<K>::partition_open_windows(std::uint32_t partition_id) const {
  check_partition(partition_id);
  const Partition& p = *partitions_[partition_id];
  const std::lock_guard<std::mutex> lock(p.mutex);
  return p.open;
}

template <class K>
std::int64_t WindowedAggregateStore<K>::closed_through() const {
  // Written with every mutex held: any one of them orders this read.
  const std::lock_guard<std::mutex> lock(partitions_[0]->mutex);
  return closed_through_;
}

template <class K>
std::size_t WindowedAggregateStore<K>::memory_bytes() const {
  // A std::map node: three links, a colour, the key, the window.
  constexpr std::size_t kNodeOverhead = 4 * sizeof(void*) + sizeof(std::int64_t);
  std::size_t total = sizeof(*this);
  for (const auto& part : partitions_) {
    const Partition& p = *part;
    const std::lock_guard<std::mutex> lock(p.mutex);
    total += sizeof(Partition) + p.removed.capacity() * sizeof(std::int64_t) +
             p.dirty_keys.capacity() * sizeof(std::size_t) + p.sessions.memory_bytes() +
             p.scratch.capacity() * sizeof(Moments);
    const auto window_bytes = [](const Window& w) {
      return kNodeOverhead + sizeof(Window) + w.table.memory_bytes() +
             w.more.capacity() * sizeof(Moments);
    };
    for (const auto& [start, w] : p.windows) total += window_bytes(w);
    total += p.spare.capacity() * sizeof(typename Windows::node_type);
    for (const auto& node : p.spare) total += window_bytes(node.mapped());
    for (std::size_t i = 0; i < p.sessions.size(); ++i) {
      const KeySessions& ks = p.sessions.value_at(i);
      total += ks.spans.capacity() * sizeof(Session) + ks.partials.capacity() * sizeof(Moments);
    }
  }
  return total;
}

// ---------------------------------------------------------------------------------------
// Captures.

template <class K>
std::string WindowedAggregateStore<K>::header(bool delta) const {
  std::string out;
  put_u32(out, delta ? kDeltaLayoutVersion : kLayoutVersion);
  put_u32(out, num_partitions());
  out.push_back(static_cast<char>(K::kTag));
  out.push_back(static_cast<char>(spec_.kind));
  put_u64(out, static_cast<std::uint64_t>(spec_.size));
  put_u64(out, static_cast<std::uint64_t>(spec_.step));
  put_u64(out, static_cast<std::uint64_t>(spec_.gap));
  put_u64(out, static_cast<std::uint64_t>(closed_through_));
  if (delta) {
    put_u32(out, identity_);
    put_u64(out, sequence_ + 1);
  }
  put_u32(out, static_cast<std::uint32_t>(columns_.size()));
  for (const std::string& name : columns_) {
    put_u32(out, static_cast<std::uint32_t>(name.size()));
    out += name;
  }
  return out;
}

template <class K>
void WindowedAggregateStore<K>::check_header(std::string_view value, bool delta,
                                             std::uint32_t& parent, std::uint64_t& sequence,
                                             std::int64_t& closed) const {
  ByteReader in(value, delta ? "window store delta header" : "window store snapshot header");
  const std::uint32_t version = in.u32();
  const std::uint32_t np = in.u32();
  const auto tag = static_cast<std::uint8_t>(in.take(1)[0]);
  WindowSpec written;
  written.kind = static_cast<WindowKind>(static_cast<std::uint8_t>(in.take(1)[0]));
  written.size = static_cast<std::int64_t>(in.u64());
  written.step = static_cast<std::int64_t>(in.u64());
  written.gap = static_cast<std::int64_t>(in.u64());
  closed = static_cast<std::int64_t>(in.u64());
  if (delta) {
    parent = in.u32();
    sequence = in.u64();
  }
  const std::uint32_t named = in.u32();
  if (named > kMaxColumns || named > in.remaining() / 4) {
    corrupt("a header with " + std::to_string(named) + " value columns");
  }
  std::vector<std::string> columns;
  columns.reserve(named);
  for (std::uint32_t c = 0; c < named; ++c) {
    const std::uint32_t length = in.u32();
    if (length > in.remaining()) corrupt("a value column name longer than the header");
    columns.emplace_back(in.take(length));
  }
  if (!in.at_end()) corrupt("trailing bytes in the header");
  if (version != (delta ? kDeltaLayoutVersion : kLayoutVersion)) {
    corrupt("unsupported layout version " + std::to_string(version));
  }
  if (tag != K::kTag) {
    corrupt("written by a store with a different key_type (this store's is '" +
            std::string(K::kName) + "')");
  }
  if (!(written == spec_)) {
    corrupt("written by a store of " +
            (static_cast<std::uint8_t>(written.kind) > 2 ? std::string("unknown windows")
                                                         : describe(written)) +
            " (this store has " + describe(spec_) + ")");
  }
  if (columns != columns_) {
    corrupt("written by a store with " + describe_value_columns(columns) + " (this store has " +
            describe_value_columns(columns_) + ")");
  }
  if (delta ? np != num_partitions() : np > num_partitions()) {
    corrupt("written by a store of " + std::to_string(np) + " partitions (this one has " +
            std::to_string(num_partitions()) + ")");
  }
}

template <class K>
void WindowedAggregateStore<K>::encode_window(std::string& chunk, const Window& w,
                                              std::size_t begin, std::size_t end) const {
  const std::size_t extra = width_ - 1;
  put_u32(chunk, static_cast<std::uint32_t>(end - begin));
  for (std::size_t i = begin; i < end; ++i) {
    K::encode(chunk, w.table.key_at(i));
    w.table.value_at(i).encode(chunk);
    for (std::size_t c = 0; c < extra; ++c) w.more[i * extra + c].encode(chunk);
  }
}

template <class K>
void WindowedAggregateStore<K>::encode_sessions(std::string& chunk, View key,
                                                const KeySessions& ks) const {
  K::encode(chunk, key);
  put_u32(chunk, static_cast<std::uint32_t>(ks.spans.size()));
  for (std::size_t j = 0; j < ks.spans.size(); ++j) {
    put_u64(chunk, static_cast<std::uint64_t>(ks.spans[j].start));
    put_u64(chunk, static_cast<std::uint64_t>(ks.spans[j].end));
    for (std::size_t c = 0; c < width_; ++c) ks.partials[j * width_ + c].encode(chunk);
  }
}

// Entries [0, n) of `table` (or those `pick` names) ordered by key: session captures list
// keys in key order, so equal contents give equal bytes whatever order the keys were
// folded (or restored) in, and a rebuilt session table captures as it did before.
template <class K, class Table>
std::vector<std::size_t> key_order(const Table& table, std::size_t n, const std::size_t* pick) {
  std::vector<std::size_t> order(n);
  for (std::size_t r = 0; r < n; ++r) order[r] = pick == nullptr ? r : pick[r];
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    return K::less(table.key_at(a), table.key_at(b));
  });
  return order;
}

// Session entries `indices` (all the live ones when null) of one partition, in key order
// and chunks; entries without sessions are listed only when `indices` names them.
template <class K>
void WindowedAggregateStore<K>::write_sessions(RecordWriter& writer, std::uint32_t pid,
                                               const Partition& p,
                                               const std::vector<std::size_t>* indices) const {
  std::vector<std::size_t> order =
      indices == nullptr ? key_order<K>(p.sessions, p.sessions.size(), nullptr)
                         : key_order<K>(p.sessions, indices->size(), indices->data());
  const std::string key = partition_record_name(kSessionsPrefix, pid);
  std::string chunk;
  std::uint32_t count = 0;
  const auto flush = [&] {
    if (count == 0) return;
    store_u32(chunk.data(), count);
    writer.add(key, chunk);
    count = 0;
  };
  for (const std::size_t i : order) {
    const KeySessions& ks = p.sessions.value_at(i);
    if (indices == nullptr && ks.spans.empty()) continue;
    if (count == 0) {
      chunk.clear();
      put_u32(chunk, 0);  // the count, patched by flush
    }
    encode_sessions(chunk, p.sessions.key_at(i), ks);
    if (++count == kChunkEntries) flush();
  }
  flush();
}

template <class K>
void WindowedAggregateStore<K>::write_window(RecordWriter& writer, std::uint32_t pid,
                                             std::int64_t start, const Window& w) const {
  const std::string key = window_key(pid, start);
  const std::size_t n = w.table.size();
  std::string chunk;
  for (std::size_t begin = 0; begin < n; begin += kChunkEntries) {
    chunk.clear();
    encode_window(chunk, w, begin, std::min(n, begin + kChunkEntries));
    writer.add(key, chunk);
  }
}

template <class K>
std::string WindowedAggregateStore<K>::snapshot() {
  const AllLocks locks(partitions_);
  RecordWriter writer(RecordKind::kWindowStore);
  writer.add(kHeaderKey, header(false));
  for (std::uint32_t pid = 0; pid < num_partitions(); ++pid) {
    const Partition& p = *partitions_[pid];
    for (const auto& [start, w] : p.windows) write_window(writer, pid, start, w);
    if (sessions_kind()) write_sessions(writer, pid, p, nullptr);
  }
  std::string out = std::move(writer).finish();
  reset_tracking(out, 0);
  return out;
}

template <class K>
std::string WindowedAggregateStore<K>::snapshot_delta() {
  const AllLocks locks(partitions_);
  RecordWriter writer(RecordKind::kWindowStoreDelta);
  writer.add(kDeltaHeaderKey, header(true));
  for (std::uint32_t pid = 0; pid < num_partitions(); ++pid) {
    const Partition& p = *partitions_[pid];
    if (!p.removed.empty()) {
      std::string removed;
      put_u32(removed, static_cast<std::uint32_t>(p.removed.size()));
      for (const std::int64_t start : p.removed) put_u64(removed, static_cast<std::uint64_t>(start));
      writer.add(partition_record_name(kRemovedPrefix, pid), removed);
    }
    for (const auto& [start, w] : p.windows) {
      if (w.dirty) write_window(writer, pid, start, w);
    }
    if (!sessions_kind()) continue;
    if (p.rewritten) {
      writer.add(partition_record_name(kResetPrefix, pid), {});
      write_sessions(writer, pid, p, nullptr);
    } else {
      write_sessions(writer, pid, p, &p.dirty_keys);
    }
  }
  std::string out = std::move(writer).finish();
  reset_tracking(out, sequence_ + 1);
  return out;
}

template <class K>
void WindowedAggregateStore<K>::reset_tracking(std::string_view capture,
                                               std::uint64_t sequence) noexcept {
  for (auto& part : partitions_) {
    Partition& p = *part;
    for (auto& [start, w] : p.windows) {
      w.dirty = false;
      w.captured = true;
    }
    p.removed.clear();
    for (const std::size_t i : p.dirty_keys) p.sessions.value_at(i).dirty = false;
    p.dirty_keys.clear();
    p.rewritten = false;
  }
  identity_ = record_identity(capture);
  sequence_ = sequence;
}

template <class K>
void WindowedAggregateStore<K>::read_window_chunk(std::string_view value, std::int64_t start,
                                                  Staged& staged) const {
  if (sessions_kind()) corrupt("a window record in a store of session windows");
  if (start % spec_.step != 0 || start > kMaxTime - spec_.size) {
    corrupt("a window starting at " + std::to_string(start) + ", which is not one of " +
            describe(spec_));
  }
  ByteReader in(value, "window store window");
  const std::size_t extra = width_ - 1;
  const std::uint32_t n = in.u32();
  const std::size_t min_entry = 4 + width_ * Moments::kEncodedSize;
  if (n == 0) corrupt("an empty window chunk");
  if (n > in.remaining() / min_entry) corrupt("chunk entry count larger than its bytes");
  Window& w = staged.windows[start];
  for (std::uint32_t i = 0; i < n; ++i) {
    const View key = K::decode(in);
    const auto [idx, inserted] = w.table.emplace(key, K::hash(key));
    if (!inserted) corrupt("a key listed twice in the window starting at " + std::to_string(start));
    w.table.value_at(idx) = Moments::decode(in);
    for (std::size_t c = 0; c < extra; ++c) w.more.push_back(Moments::decode(in));
  }
  if (!in.at_end()) corrupt("trailing bytes in a window chunk");
}

template <class K>
void WindowedAggregateStore<K>::read_sessions_chunk(std::string_view value, Staged& staged,
                                                    bool delta) const {
  if (!sessions_kind()) corrupt("a sessions record in a store of " + describe(spec_));
  ByteReader in(value, "window store sessions");
  const std::uint32_t n = in.u32();
  if (n > in.remaining() / 8) corrupt("chunk entry count larger than its bytes");
  const std::size_t per_session = 16 + width_ * Moments::kEncodedSize;
  for (std::uint32_t i = 0; i < n; ++i) {
    const View key = K::decode(in);
    const std::uint32_t k = in.u32();
    if (k == 0 && !delta) corrupt("a key without sessions");
    if (k > in.remaining() / per_session) corrupt("a session count larger than its bytes");
    const auto [idx, inserted] = staged.sessions.emplace(key, K::hash(key));
    if (!inserted) corrupt("a key's sessions listed twice");
    KeySessions& ks = staged.sessions.value_at(idx);
    ks.spans.reserve(k);
    ks.partials.reserve(static_cast<std::size_t>(k) * width_);
    for (std::uint32_t j = 0; j < k; ++j) {
      const auto start = static_cast<std::int64_t>(in.u64());
      const auto end = static_cast<std::int64_t>(in.u64());
      if (static_cast<i128>(end) - start < spec_.gap) {
        corrupt("a session [" + std::to_string(start) + ", " + std::to_string(end) +
                ") shorter than the gap");
      }
      if (j > 0 && start <= ks.spans.back().start) corrupt("sessions not in ascending order");
      ks.spans.push_back(Session{start, end});
      for (std::size_t c = 0; c < width_; ++c) ks.partials.push_back(Moments::decode(in));
    }
  }
  if (!in.at_end()) corrupt("trailing bytes in a sessions chunk");
}

template <class K>
std::vector<typename WindowedAggregateStore<K>::Staged> WindowedAggregateStore<K>::stage(
    std::string_view data, bool delta, std::uint32_t& parent, std::uint64_t& sequence,
    std::int64_t& closed) const {
  RecordReader reader(data);
  reader.expect_kind(delta ? RecordKind::kWindowStoreDelta : RecordKind::kWindowStore);
  RecordView record;
  if (!reader.next(record) || record.key != (delta ? kDeltaHeaderKey : kHeaderKey)) {
    corrupt("missing header record");
  }
  check_header(record.value, delta, parent, sequence, closed);
  const std::uint32_t np = num_partitions();
  std::vector<Staged> staged(np);
  std::string_view rest;
  while (reader.next(record)) {
    if (const auto pid = partition_of(record.key, kWindowPrefix, np, 8, &rest)) {
      read_window_chunk(record.value, static_cast<std::int64_t>(load_u64(rest.data())),
                        staged[*pid]);
    } else if (const auto spid = partition_of(record.key, kSessionsPrefix, np)) {
      read_sessions_chunk(record.value, staged[*spid], delta);
    } else if (const auto rpid = delta ? partition_of(record.key, kRemovedPrefix, np)
                                       : std::nullopt) {
      Staged& s = staged[*rpid];
      if (sessions_kind()) corrupt("delta: removed windows in a store of session windows");
      if (!s.removed.empty() || !s.windows.empty()) corrupt("delta: misplaced removed windows");
      ByteReader in(record.value, "window store removed windows");
      const std::uint32_t n = in.u32();
      if (n == 0 || n > in.remaining() / 8) corrupt("delta: a bad removed window count");
      s.removed.reserve(n);
      for (std::uint32_t i = 0; i < n; ++i) s.removed.push_back(static_cast<std::int64_t>(in.u64()));
      if (!in.at_end()) corrupt("delta: trailing bytes in removed windows");
      std::vector<std::int64_t> sorted = s.removed;
      std::sort(sorted.begin(), sorted.end());
      if (std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
        corrupt("delta: a window removed twice");
      }
    } else if (const auto xpid = delta ? partition_of(record.key, kResetPrefix, np)
                                       : std::nullopt) {
      Staged& s = staged[*xpid];
      if (!sessions_kind() || s.reset || s.sessions.size() != 0 || !record.value.empty()) {
        corrupt("delta: misplaced reset");
      }
      s.reset = true;
    } else {
      corrupt("unknown record");
    }
  }
  return staged;
}

template <class K>
void WindowedAggregateStore<K>::restore(std::string_view data) {
  std::uint32_t parent = 0;
  std::uint64_t sequence = 0;
  std::int64_t closed = kMinTime;
  std::vector<Staged> staged = stage(data, false, parent, sequence, closed);
  const AllLocks locks(partitions_);  // released before `staged` (the old state) is freed
  for (std::uint32_t pid = 0; pid < num_partitions(); ++pid) {
    Partition& p = *partitions_[pid];
    p.windows.swap(staged[pid].windows);
    p.dirty_keys.clear();  // indices into the table being replaced
    std::swap(p.sessions, staged[pid].sessions);
    p.removed.clear();
    recount(p);
  }
  closed_through_ = closed;
  reset_tracking(data, 0);
}

template <class K>
void WindowedAggregateStore<K>::apply_delta(std::string_view data) {
  std::uint32_t parent = 0;
  std::uint64_t sequence = 0;
  std::int64_t closed = kMinTime;
  std::vector<Staged> staged = stage(data, true, parent, sequence, closed);
  const AllLocks locks(partitions_);
  if (parent != identity_) {
    corrupt("delta " + std::to_string(sequence) +
            " does not follow this store's state (its parent is another snapshot or delta; "
            "this store is at delta " + std::to_string(sequence_) + " of its chain)");
  }
  for (std::uint32_t pid = 0; pid < num_partitions(); ++pid) {
    for (const std::int64_t start : staged[pid].removed) {
      if (partitions_[pid]->windows.count(start) == 0) {
        corrupt("delta removes the window starting at " + std::to_string(start) +
                " of partition " + std::to_string(pid) + ", which this store does not hold");
      }
    }
  }
  // Nothing below rejects the delta; only memory exhaustion could stop it part way.
  for (std::uint32_t pid = 0; pid < num_partitions(); ++pid) {
    Partition& p = *partitions_[pid];
    Staged& s = staged[pid];
    for (const std::int64_t start : s.removed) p.windows.erase(start);
    for (auto& [start, w] : s.windows) p.windows.insert_or_assign(start, std::move(w));
    if (s.reset) {
      p.dirty_keys.clear();  // indices into the table being replaced
      std::swap(p.sessions, s.sessions);
    } else {
      for (std::size_t i = 0; i < s.sessions.size(); ++i) {
        KeySessions& from = s.sessions.value_at(i);
        KeySessions& into = p.sessions.find_or_insert(s.sessions.key_at(i), s.sessions.hash_at(i));
        into.spans = std::move(from.spans);
        into.partials = std::move(from.partials);
      }
    }
    recount(p);
  }
  closed_through_ = closed;
  reset_tracking(data, sequence);
}

template class WindowedAggregateStore<Int64Keys>;
template class WindowedAggregateStore<BytesKeys>;

}  // namespace streamstate
