// Partition-local windowed aggregates over event time: the numeric partials (Moments) of
// every (key, window) a partition folded, held until the watermark passes the window's end
// and then handed out, sorted, and freed.
//
// Windows are aligned to the epoch. Tumbling: [floor(t / size) * size, + size). Hopping:
// every [k * step, k * step + size) holding t (size a multiple of step, so each event is in
// size / step windows). Session: an event opens [t, t + gap); a key's overlapping open
// sessions merge into [first, last + gap).
//
// Tumbling and hopping windows of a partition live in an ordered map start -> window, each
// window one FlatTable key -> partials (column 0 in the entry, columns 1.. side by side in a
// parallel array, as PartitionAggregator lays them out). Every window has the same length,
// so ordering by start orders by end too: emit() pops whole windows off the front, in
// O(what it emits). Sessions live in one FlatTable per partition: key -> the key's sessions,
// sorted by start, each with its width() partials; emit() scans the keys.
//
// A window whose end <= the watermark is closed: nothing folds into it again, whether or
// not it was emitted yet (so results never depend on when emit ran). The store remembers
// the highest watermark emit() was given (closed_through()) and treats it as the floor of
// every later fold's watermark, so an emitted window can never be folded into again and
// emitted twice. Rows that every window of theirs refuses are "late": counted, not folded.
//
// Captures: snapshot() writes everything; snapshot_delta() only what changed since the
// previous capture: tumbling and hopping windows changed since are written whole, windows
// that existed at the previous capture and were emitted since are named; session keys whose
// sessions changed are written with their whole (possibly empty) list. Identity and
// sequence follow NumericAggregateStore: a delta names its parent's identity (the CRC32C of
// the parent container) and is refused anywhere else. A window's keys are written in the
// order the partition first folded them, which a restore or delta keeps: the same folds in
// the same order, or a replica restored from a capture and its deltas, capture the same
// bytes, and a capture reads the partials in memory order. Session keys come in key order.
//
// Locking: each partition's mutex is held by fold of that partition; emit, emit_all,
// snapshot, snapshot_delta, restore and apply_delta take every partition's mutex in
// ascending order (the order NumericAggregateStore's captures use), so misuse (a capture
// while partitions fold) is serialised instead of being a data race. Store-wide fields
// (closed_through, identity, sequence) are written only with every mutex held, and read by
// fold with its own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "core/flat_table.h"
#include "core/key_traits.h"
#include "core/numeric_aggregate_store.h"
#include "core/record_codec.h"
#include "core/stats.h"

namespace streamstate {

enum class WindowKind : std::uint8_t { kTumbling = 0, kHopping = 1, kSession = 2 };

[[nodiscard]] std::string_view window_kind_name(WindowKind kind) noexcept;

// The shape of a store's windows, int64 milliseconds. Tumbling uses size (step is size);
// hopping size and step; session gap.
struct WindowSpec {
  WindowKind kind = WindowKind::kTumbling;
  std::int64_t size = 0;
  std::int64_t step = 0;
  std::int64_t gap = 0;

  // InvalidArgument unless: tumbling size > 0 (step 0 or size), hopping 0 < step <= size
  // with size % step == 0, session gap > 0; the fields a kind does not use are 0.
  void validate() const;
  [[nodiscard]] bool operator==(const WindowSpec&) const noexcept = default;
};

// Emitted rows as finished columns, one row per (key, window), sorted by (window_end,
// window_start, key): keys in K's KeyColumn, the window bounds, and one StatArrays per
// value column.
template <class K>
struct WindowRows {
  typename K::KeyColumn keys;
  std::vector<std::int64_t> starts;
  std::vector<std::int64_t> ends;
  std::vector<StatArrays> columns;
  [[nodiscard]] std::size_t size() const noexcept { return starts.size(); }
};

template <class K>
class WindowedAggregateStore {
 public:
  using View = typename K::View;

  static constexpr std::size_t kMaxColumns = NumericAggregateStore<K>::kMaxColumns;
  // Threads emit_partitions() writes partitions' rows with (the calling one included).
  static constexpr std::size_t kEmitThreads = 8;

  // InvalidArgument unless 1 <= num_partitions <= 65536, the spec validates, and the
  // columns are as NumericAggregateStore takes them (empty: one unnamed column).
  WindowedAggregateStore(std::uint32_t num_partitions, WindowSpec spec, NanPolicy policy,
                         std::vector<std::string> columns = {});

  [[nodiscard]] std::uint32_t num_partitions() const noexcept {
    return static_cast<std::uint32_t>(partitions_.size());
  }
  [[nodiscard]] const WindowSpec& spec() const noexcept { return spec_; }
  [[nodiscard]] NanPolicy nan_policy() const noexcept { return policy_; }
  [[nodiscard]] const std::vector<std::string>& columns() const noexcept { return columns_; }
  [[nodiscard]] std::size_t width() const noexcept { return width_; }

  // InvalidArgument naming the first of the n times whose windows would reach outside
  // int64 (fold checks this itself before folding anything; a caller folding one batch in
  // several calls checks the whole batch first).
  void check_times(const std::int64_t* times, std::size_t n) const;

  // Folds n rows (keys[i], times[i], width() values at values + i * width()) into the
  // partition's open windows. Returns how many rows were late (every window of theirs is
  // closed at max(watermark, closed_through())). Under NanPolicy::kRaise a NaN anywhere
  // throws InvalidArgument before anything is folded; under kSkip each value column skips
  // its own NaN, and a row whose values are all NaN folds nothing (and is not late).
  std::size_t fold(std::uint32_t partition_id, const View* keys, const std::int64_t* times,
                   const double* values, std::size_t n, std::int64_t watermark);

  // Every window whose end <= watermark, across partitions, removed from the state; the
  // watermark becomes closed_through() if it is higher. A key folded in several partitions
  // for the same window gives one row, its partials merged in ascending partition order.
  [[nodiscard]] WindowRows<K> emit(std::int64_t watermark);
  // Every open window (the end of a bounded stream); closed_through() is unchanged.
  [[nodiscard]] WindowRows<K> emit_all();
  // emit() without the merge and (tumbling, hopping) the sort: one WindowRows per
  // partition, written by up to kEmitThreads threads at once. A partition's tumbling or
  // hopping rows come window by window (by start), a window's keys in the order the
  // partition first folded (or restored) them; its session rows by (end, start, key). So
  // the rows depend only on what was folded, in what order, through restores too. A key
  // folded for one window in several partitions gives a row in each: for callers that
  // route each key to one partition (a pipeline does). The state afterwards is emit()'s.
  [[nodiscard]] std::vector<WindowRows<K>> emit_partitions(std::int64_t watermark);
  // emit_all() as emit_partitions() gives it.
  [[nodiscard]] std::vector<WindowRows<K>> emit_all_partitions();

  // (key, window) pairs held across partitions.
  [[nodiscard]] std::size_t open_windows() const;
  [[nodiscard]] std::size_t partition_open_windows(std::uint32_t partition_id) const;
  // The highest watermark emit() was given (INT64_MIN for a fresh store).
  [[nodiscard]] std::int64_t closed_through() const;
  [[nodiscard]] std::size_t memory_bytes() const;

  // kWindowStore container of every partition's windows; resets the change tracking.
  // Equal contents folded alike give equal bytes.
  [[nodiscard]] std::string snapshot();
  // kWindowStoreDelta container of the changes since the previous capture; resets the
  // change tracking.
  [[nodiscard]] std::string snapshot_delta();
  // Validates everything into fresh structures, then swaps them in; CorruptDataError (and
  // the store unchanged) on any problem, a snapshot of other windows, key type or value
  // columns included. A snapshot of fewer partitions restores into the first ones.
  void restore(std::string_view data);
  // Validates the whole delta (container, parent identity, every entry) before changing
  // anything; CorruptDataError and the store unchanged on any problem.
  void apply_delta(std::string_view data);

  [[nodiscard]] std::uint32_t identity() const noexcept { return identity_; }
  [[nodiscard]] std::uint64_t sequence() const noexcept { return sequence_; }

 private:
  using Table = FlatTable<K, Moments>;

  // One tumbling or hopping window's keys.
  struct Window {
    Table table;
    std::vector<Moments> more;  // width - 1 per entry, parallel to the table's entries
    bool dirty = true;          // changed since the last capture
    bool captured = false;      // existed at the last capture (an emit must name it)
  };
  using Windows = std::map<std::int64_t, Window>;  // by start

  struct Session {
    std::int64_t start;
    std::int64_t end;
  };
  // A key's sessions sorted by start, with width() partials each (column 0 first).
  struct KeySessions {
    std::vector<Session> spans;
    std::vector<Moments> partials;
    bool dirty = false;  // changed since the last capture
  };
  using SessionTable = FlatTable<K, KeySessions>;

  struct Partition {
    mutable std::mutex mutex;
    Windows windows;
    // Emitted windows, emptied, whose memory the next new windows reuse: a window table
    // grows to every key of its window, and fresh memory costs a page fault per page.
    std::vector<typename Windows::node_type> spare;
    // Starts of windows that existed at the last capture and were emitted since.
    std::vector<std::int64_t> removed;
    SessionTable sessions;
    // The session table was rebuilt (dead keys dropped) since the last capture: a delta
    // then carries every key, after telling the reader to empty the table.
    bool rewritten = false;
    // Session entries whose dirty flag is set, each once.
    std::vector<std::size_t> dirty_keys;
    std::size_t open = 0;          // (key, window) pairs
    std::size_t dead_keys = 0;     // session keys without a session
    std::vector<Moments> scratch;  // a merged session's partials while folding
  };

  // Everything a restore or delta decodes, before it is installed.
  struct Staged {
    Windows windows;
    std::vector<std::int64_t> removed;
    SessionTable sessions;
    bool reset = false;
    bool any = false;
  };

  class AllPartitions;
  struct RowRef;

  void check_partition(std::uint32_t partition_id) const;
  [[nodiscard]] bool sessions_kind() const noexcept { return spec_.kind == WindowKind::kSession; }
  void fold_windows(Partition& p, const View* keys, const std::int64_t* times,
                    const double* values, std::size_t n, std::int64_t closed, std::size_t& late);
  // Folds n rows, all of whose times have `w` as a window, into `w`.
  void fold_run(Partition& p, Window& w, const View* keys, const double* values,
                std::size_t n);
  void fold_sessions(Partition& p, const View* keys, const std::int64_t* times,
                     const double* values, std::size_t n, std::int64_t closed, std::size_t& late);
  // Flags session entry `index` as changed since the last capture.
  static void mark(Partition& p, std::size_t index);
  // Adds one row's values into column 0's and columns 1..'s partials.
  void add_row(Moments& first, Moments* more, const double* row) const noexcept;
  [[nodiscard]] bool skipped(const double* row) const noexcept;
  [[nodiscard]] WindowRows<K> take(std::int64_t watermark, bool everything);
  [[nodiscard]] std::vector<WindowRows<K>> take_partitions(std::int64_t watermark,
                                                           bool everything);
  // One partition's part of take_partitions: room for its rows (may throw, changes nothing),
  // then (tumbling, hopping) the rows written and the windows freed (throws nothing).
  void reserve_partition(const Partition& p, WindowRows<K>& out, std::int64_t watermark,
                         bool everything) const;
  void take_partition(Partition& p, WindowRows<K>& out, std::int64_t watermark,
                      bool everything) const noexcept;
  // The tumbling or hopping window starting at `start`, made (from a spare) if new.
  static Window& window_at(Partition& p, std::int64_t start);
  // An emitted window's node, kept as a spare (emptied, its memory kept) or freed.
  static void recycle(Partition& p, typename Windows::node_type&& node) noexcept;
  // Appends partition pid's sessions ending <= watermark (every one when `everything`).
  void closing_sessions(std::uint32_t pid, std::int64_t watermark, bool everything,
                        std::vector<RowRef>& rows) const;
  // Drops the sessions ending <= watermark (every one when `everything`) of one partition.
  void drop_sessions(Partition& p, std::int64_t watermark, bool everything);
  // One row of `first`'s partials (and the columns 1.. at `more`) appended to `out`.
  void push_row(WindowRows<K>& out, View key, std::int64_t start, std::int64_t end,
                const Moments& first, const Moments* more) const noexcept;
  // Emission: room for `rows` rows; rows of one or more windows sorted by (end, start,
  // key, partition) and appended, a key's partitions merged; the columns' final size.
  void allocate_rows(WindowRows<K>& out, std::size_t rows) const;
  void append_rows(WindowRows<K>& out, std::vector<RowRef>& rows) const;
  // By (end, start, key, partition).
  static void sort_rows(std::vector<RowRef>& rows);
  static void finish_rows(WindowRows<K>& out) noexcept;
  // Drops session keys without sessions once they outnumber the live ones.
  void compact_sessions(Partition& p);
  // Recomputes the partition's open and dead_keys counters (after a restore or delta).
  static void recount(Partition& p) noexcept;
  void reset_tracking(std::string_view capture, std::uint64_t sequence) noexcept;

  [[nodiscard]] std::string header(bool delta) const;
  void check_header(std::string_view header, bool delta, std::uint32_t& parent,
                    std::uint64_t& sequence, std::int64_t& closed) const;
  // The entries [begin, end) of `w` as one chunk.
  void encode_window(std::string& chunk, const Window& w, std::size_t begin,
                     std::size_t end) const;
  void encode_sessions(std::string& chunk, View key, const KeySessions& ks) const;
  void write_window(RecordWriter& writer, std::uint32_t pid, std::int64_t start,
                    const Window& w) const;
  // The partition's session keys (those of `indices`, or every live one when null).
  void write_sessions(RecordWriter& writer, std::uint32_t pid, const Partition& p,
                      const std::vector<std::size_t>* indices) const;
  void read_window_chunk(std::string_view value, std::int64_t start, Staged& staged) const;
  void read_sessions_chunk(std::string_view value, Staged& staged, bool delta) const;
  // Reads a snapshot's or delta's records into per-partition staged state.
  std::vector<Staged> stage(std::string_view data, bool delta, std::uint32_t& parent,
                            std::uint64_t& sequence, std::int64_t& closed) const;

  WindowSpec spec_;
  NanPolicy policy_;
  std::vector<std::string> columns_;
  std::size_t width_;
  std::vector<std::unique_ptr<Partition>> partitions_;
  std::int64_t closed_through_;
  std::uint32_t identity_ = 0;
  std::uint64_t sequence_ = 0;
};

extern template class WindowedAggregateStore<Int64Keys>;
extern template class WindowedAggregateStore<BytesKeys>;

}  // namespace streamstate
