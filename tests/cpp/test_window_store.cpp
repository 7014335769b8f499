// C++ unit tests for the windowed aggregate store (run by CI under ASan/UBSan and TSan):
// window assignment, lateness, emission order, captures, corrupt input, and partitions
// folding from their own threads while another thread emits and captures.
#include <atomic>
#include <cstdint>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "core/errors.h"
#include "core/window_store.h"

#include "check.h"

namespace {

using streamstate::BytesKeys;
using streamstate::Int64Keys;
using streamstate::NanPolicy;
using streamstate::WindowKind;
using streamstate::WindowSpec;
using streamstate::test::check_summary;
using streamstate::test::throws_corrupt;
using Int64Store = streamstate::WindowedAggregateStore<Int64Keys>;
using BytesStore = streamstate::WindowedAggregateStore<BytesKeys>;

std::int64_t total_count(const streamstate::WindowRows<Int64Keys>& rows) {
  std::int64_t total = 0;
  for (std::size_t i = 0; i < rows.size(); ++i) total += rows.columns[0].count[i];
  return total;
}

void test_tumbling_emit_and_lateness() {
  Int64Store store(2, WindowSpec{WindowKind::kTumbling, 10, 0, 0}, NanPolicy::kSkip);
  const std::int64_t keys[] = {1, 2, 1, 1};
  const std::int64_t times[] = {-1, 5, 12, 25};
  const double values[] = {1, 2, 3, 4};
  CHECK(store.fold(0, keys, times, values, 4, -100) == 0);
  CHECK(store.fold(1, keys, times, values, 1, -100) == 0);  // key 1 at -1 in partition 1
  CHECK(store.open_windows() == 5);
  const auto rows = store.emit(10);
  // [-10, 0) key 1 from both partitions (merged), then [0, 10) key 2.
  CHECK(rows.size() == 2);
  CHECK(rows.starts[0] == -10 && rows.ends[0] == 0 && rows.keys.keys[0] == 1);
  CHECK(rows.columns[0].count[0] == 2 && rows.columns[0].sum[0] == 2.0);
  CHECK(rows.starts[1] == 0 && rows.keys.keys[1] == 2);
  CHECK(store.open_windows() == 2 && store.closed_through() == 10);
  // Below closed_through: late whatever watermark the fold is given.
  const std::int64_t late_time[] = {7};
  CHECK(store.fold(0, keys, late_time, values, 1, -100) == 1);
  CHECK(store.open_windows() == 2);
  CHECK(total_count(store.emit_all()) == 2 && store.open_windows() == 0);
}

void test_hopping_and_sessions() {
  Int64Store hopping(1, WindowSpec{WindowKind::kHopping, 10, 5, 0}, NanPolicy::kSkip);
  const std::int64_t key[] = {7};
  const std::int64_t t[] = {12};
  const double v[] = {3.0};
  CHECK(hopping.fold(0, key, t, v, 1, 0) == 0);
  const auto windows = hopping.emit_all();
  CHECK(windows.size() == 2 && windows.starts[0] == 5 && windows.starts[1] == 10);

  BytesStore sessions(1, WindowSpec{WindowKind::kSession, 0, 0, 10}, NanPolicy::kSkip);
  const std::string_view keys[] = {"a", "a", "a", "b"};
  const std::int64_t times[] = {0, 15, 8, 5};
  const double values[] = {1, 2, 3, 4};
  CHECK(sessions.fold(0, keys, times, values, 4, -100) == 0);
  CHECK(sessions.open_windows() == 2);  // a: [0, 25) after the bridge at 8; b: [5, 15)
  const auto rows = sessions.emit(25);
  CHECK(rows.size() == 2);
  CHECK(rows.ends[0] == 15 && rows.ends[1] == 25 && rows.starts[1] == 0);
  CHECK(rows.columns[0].count[1] == 3);
}

void test_times_beyond_int64_are_refused() {
  Int64Store store(1, WindowSpec{WindowKind::kTumbling, 7, 0, 0}, NanPolicy::kSkip);
  const std::int64_t keys[] = {1, 2};
  const std::int64_t times[] = {0, std::numeric_limits<std::int64_t>::min()};
  const double values[] = {1, 2};
  bool refused = false;
  try {
    (void)store.fold(0, keys, times, values, 2, 0);
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  CHECK(refused && store.open_windows() == 0);
  bool bad_spec = false;
  try {
    Int64Store hop(1, WindowSpec{WindowKind::kHopping, 10, 3, 0}, NanPolicy::kSkip);
  } catch (const std::invalid_argument&) {
    bad_spec = true;
  }
  CHECK(bad_spec);
}

void test_captures_round_trip_and_corruption() {
  for (const WindowSpec spec : {WindowSpec{WindowKind::kTumbling, 10, 0, 0},
                                WindowSpec{WindowKind::kHopping, 20, 10, 0},
                                WindowSpec{WindowKind::kSession, 0, 0, 15}}) {
    BytesStore live(2, spec, NanPolicy::kSkip, {"x", "y"});
    BytesStore replica(2, spec, NanPolicy::kSkip, {"x", "y"});
    replica.restore(live.snapshot());
    std::mt19937_64 rng(7);
    std::vector<std::string> names;
    for (int k = 0; k < 50; ++k) names.push_back("key" + std::to_string(k));
    for (int round = 0; round < 10; ++round) {
      std::vector<std::string_view> keys;
      std::vector<std::int64_t> times;
      std::vector<double> values;
      for (int i = 0; i < 200; ++i) {
        keys.push_back(names[rng() % names.size()]);
        times.push_back(round * 20 + static_cast<std::int64_t>(rng() % 40));
        values.push_back(static_cast<double>(rng() % 100));
        values.push_back(static_cast<double>(rng() % 7));
      }
      (void)live.fold(static_cast<std::uint32_t>(round % 2), keys.data(), times.data(),
                      values.data(), keys.size(), round * 20 - 10);
      (void)live.emit(round * 20);
      replica.apply_delta(live.snapshot_delta());
      CHECK(replica.snapshot() == live.snapshot());
    }
    const std::string snap = live.snapshot();
    // Truncated or flipped bytes: refused, and the replica keeps what it held.
    CHECK(throws_corrupt([&] { replica.restore(std::string_view(snap).substr(0, snap.size() - 1)); }));
    std::string flipped = snap;
    flipped[flipped.size() / 2] = static_cast<char>(flipped[flipped.size() / 2] ^ 0x10);
    CHECK(throws_corrupt([&] { replica.restore(flipped); }));
    CHECK(replica.snapshot() == snap);
    BytesStore other_columns(2, spec, NanPolicy::kSkip, {"x"});
    CHECK(throws_corrupt([&] { other_columns.restore(snap); }));
    const auto a = live.emit_all();
    const auto b = replica.emit_all();
    CHECK(a.size() == b.size() && a.keys.bytes == b.keys.bytes && a.ends == b.ends);
    for (std::size_t i = 0; i < a.size(); ++i) {
      CHECK(a.columns[1].sum[i] == b.columns[1].sum[i]);
    }
  }
}

// Each partition folds from its own thread while another thread emits and snapshots:
// every event is emitted exactly once (nothing is late: fold watermarks stay below every
// window end), and TSan sees the locks order every access.
void test_concurrent_partitions() {
  constexpr std::uint32_t kPartitions = 4;
  constexpr int kBatches = 40;
  constexpr std::size_t kRows = 500;
  Int64Store store(kPartitions, WindowSpec{WindowKind::kTumbling, 100, 0, 0}, NanPolicy::kSkip);
  std::atomic<bool> done{false};
  std::atomic<std::int64_t> emitted{0};
  std::vector<std::thread> workers;
  for (std::uint32_t p = 0; p < kPartitions; ++p) {
    workers.emplace_back([&, p] {
      std::mt19937_64 rng(p);
      std::vector<std::int64_t> keys(kRows);
      std::vector<std::int64_t> times(kRows);
      std::vector<double> values(kRows, 1.0);
      for (int b = 0; b < kBatches; ++b) {
        for (std::size_t i = 0; i < kRows; ++i) {
          keys[i] = static_cast<std::int64_t>(rng() % 1000);
          times[i] = static_cast<std::int64_t>(rng() % 100000);
        }
        CHECK(store.fold(p, keys.data(), times.data(), values.data(), kRows, -1) == 0);
      }
    });
  }
  std::thread reader([&] {
    while (!done.load()) {
      emitted += total_count(store.emit_all());  // emit_all leaves closed_through alone
      for (const auto& rows : store.emit_all_partitions()) emitted += total_count(rows);
      CHECK(!store.snapshot().empty());
      (void)store.open_windows();
    }
  });
  for (auto& w : workers) w.join();
  done = true;
  reader.join();
  emitted += total_count(store.emit_all());
  CHECK(emitted.load() == static_cast<std::int64_t>(kPartitions) * kBatches * kRows);
  CHECK(store.open_windows() == 0);
}

// Partitions emitted by several threads at once (enough rows for the parallel path): each
// partition's rows are its own, window by window, and the emitted windows' memory is
// reused by the next windows, which start empty.
void test_parallel_partition_emission() {
  constexpr std::uint32_t kPartitions = 4;
  constexpr std::size_t kRows = 20000;
  Int64Store store(kPartitions, WindowSpec{WindowKind::kTumbling, 10, 0, 0}, NanPolicy::kSkip);
  std::vector<std::int64_t> keys(kRows);
  std::vector<std::int64_t> times(kRows);
  const std::vector<double> values(kRows, 1.0);
  for (int round = 0; round < 3; ++round) {
    for (std::uint32_t p = 0; p < kPartitions; ++p) {
      for (std::size_t i = 0; i < kRows; ++i) {
        keys[i] = static_cast<std::int64_t>(i * kPartitions + p);
        times[i] = round * 20 + static_cast<std::int64_t>(i % 20);  // two windows a round
      }
      CHECK(store.fold(p, keys.data(), times.data(), values.data(), kRows, round * 20) == 0);
    }
    const auto parts = store.emit_partitions(round * 20 + 20);
    CHECK(parts.size() == kPartitions);
    for (std::uint32_t p = 0; p < kPartitions; ++p) {
      const auto& rows = parts[p];
      CHECK(rows.size() == kRows && total_count(rows) == static_cast<std::int64_t>(kRows));
      bool own = true;
      bool by_window = true;
      for (std::size_t i = 0; i < rows.size(); ++i) {
        own = own && rows.keys.keys[i] % std::int64_t{kPartitions} == std::int64_t{p};
        by_window = by_window && (i == 0 || rows.starts[i - 1] <= rows.starts[i]);
      }
      CHECK(own && by_window);
    }
    CHECK(store.open_windows() == 0 && store.closed_through() == round * 20 + 20);
  }
}

}  // namespace

int main() {
  test_tumbling_emit_and_lateness();
  test_hopping_and_sessions();
  test_times_beyond_int64_are_refused();
  test_captures_round_trip_and_corruption();
  test_concurrent_partitions();
  test_parallel_partition_emission();
  return check_summary("test_window_store");
}
