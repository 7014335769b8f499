// C++ unit tests for the flat tables, the opaque aggregate store and the numeric store
// (run by CI under ASan/UBSan as well).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include "core/aggregate_store.h"
#include "core/errors.h"
#include "core/flat_table.h"
#include "core/numeric_aggregate_store.h"
#include "core/partition_aggregator.h"
#include "core/partition_router.h"
#include "core/record_codec.h"
#include "core/stats.h"

#include "check.h"

namespace {

using streamstate::Moments;
using streamstate::test::check_summary;
using streamstate::test::throws_corrupt;

// Built by appending: GCC 12 at -O3 reports a false -Wrestrict for "lit" + std::to_string().
std::string name(const char* prefix, long a, const char* middle = nullptr, long b = 0) {
  std::string out(prefix);
  out += std::to_string(a);
  if (middle != nullptr) {
    out += middle;
    out += std::to_string(b);
  }
  return out;
}

void test_int64_flat_table() {
  streamstate::Int64FlatTable<Moments> table;
  std::unordered_map<std::int64_t, std::uint64_t> reference;
  std::mt19937_64 rng(42);
  for (int i = 0; i < 300000; ++i) {
    const auto key = static_cast<std::int64_t>(rng() % 70000) - 35000;
    table.find_or_insert(key).add(static_cast<double>(i));
    ++reference[key];
  }
  CHECK(table.size() == reference.size());
  for (const auto& [key, count] : reference) {
    const Moments* m = table.find(key);
    CHECK(m != nullptr && m->count == count);
  }
  CHECK(table.find(1LL << 60) == nullptr);
  // Iteration visits every entry once, in insertion order, with stable indices.
  std::size_t seen = 0;
  for (const auto& entry : table) {
    CHECK(table.find_index(entry.key) == seen);
    ++seen;
  }
  CHECK(seen == table.size());
  const std::size_t held = table.memory_bytes();
  CHECK(held >= table.size() * (sizeof(std::int64_t) + sizeof(Moments)));
  table.clear();
  CHECK(table.empty() && table.find(reference.begin()->first) == nullptr);
  CHECK(table.memory_bytes() == held);  // clear keeps the memory for reuse
  table.release();
  CHECK(table.memory_bytes() < 1024);
  table.reserve(1000);
  const std::size_t reserved = table.memory_bytes();
  for (int i = 0; i < 1000; ++i) table.find_or_insert(i * 7919);
  CHECK(table.memory_bytes() == reserved);  // no growth within the reservation
  const auto [index, inserted] = table.emplace(7919);
  CHECK(!inserted && index == 1);
}

void test_bytes_flat_table() {
  streamstate::BytesFlatTable<Moments> table;
  for (int i = 0; i < 50000; ++i) {
    table.find_or_insert(name("key-", i % 9973)).add(1.0);
  }
  table.find_or_insert(std::string_view{}).add(2.0);
  table.find_or_insert(std::string("a\0b", 3)).add(3.0);
  CHECK(table.size() == 9973 + 2);
  CHECK(table.find("key-12")->count == 6);
  CHECK(table.find(std::string_view{}) != nullptr);
  CHECK(table.find(std::string("a\0b", 3))->sum == 3.0);
  CHECK(table.find(std::string("a\0c", 3)) == nullptr);
  CHECK(table.key_at(table.find_index("key-77")) == "key-77");
  CHECK(table.hash_at(table.find_index("key-77")) == streamstate::hash_bytes("key-77"));
  CHECK(streamstate::hash_bytes("a") != streamstate::hash_bytes(std::string("a\0", 2)));
}

void test_opaque_store() {
  streamstate::AggregateStore store(3);
  store.publish("g", 2, "p2");
  store.publish("g", 0, "p0");
  store.publish("h", 1, "x");
  store.publish("g", 0, "p0b");
  CHECK(store.size() == 3);
  const auto partials = store.collect_partials("g");
  CHECK(partials.size() == 2 && partials[0].first == 0 && partials[0].second == "p0b" &&
        partials[1].first == 2);
  CHECK(store.groups() == (std::vector<std::string>{"g", "h"}));
  bool rejected = false;
  try {
    store.publish("g", 3, "bad");
  } catch (const streamstate::InvalidArgument&) {
    rejected = true;
  }
  CHECK(rejected);

  const std::string snap = store.snapshot();
  streamstate::AggregateStore copy(3);
  copy.publish("old", 0, "v");
  copy.restore(snap);
  CHECK(copy.snapshot() == snap && !copy.get_partial("old", 0).has_value());

  // A failed restore leaves everything as it was.
  std::string flipped = snap;
  flipped[flipped.size() / 2] ^= 0x40;
  CHECK(throws_corrupt([&] { copy.restore(flipped); }));
  streamstate::AggregateStore small(2);
  small.publish("keep", 1, "me");
  const std::string before = small.snapshot();
  CHECK(throws_corrupt([&] { small.restore(snap); }));  // partition id 2 >= 2
  CHECK(small.snapshot() == before);

  CHECK(store.remove_group("g") == 2);
  CHECK(store.size() == 1 && store.groups() == std::vector<std::string>{"h"});
  CHECK(store.memory_bytes() > 0);
}

void test_opaque_store_threads_and_snapshots() {
  constexpr int kThreads = 4;
  constexpr int kBatches = 1000;
  constexpr int kWidth = 40;
  streamstate::AggregateStore store(kThreads);
  std::atomic<int> running{kThreads};
  std::vector<std::thread> workers;
  for (int t = 0; t < kThreads; ++t) {
    workers.emplace_back([&store, &running, t] {
      std::vector<std::string> keys;
      for (int i = 0; i < kWidth; ++i) keys.push_back(name("t", t, "k", i));
      const std::vector<std::string_view> key_views(keys.begin(), keys.end());
      for (int b = 0; b < kBatches; ++b) {
        const std::string value = std::to_string(b);
        const std::vector<std::string_view> values(kWidth, value);
        store.publish_many(static_cast<std::uint32_t>(t), key_views, values);
      }
      --running;
    });
  }
  int torn = 0;
  int taken = 0;
  do {  // at least once, however fast the publishers were
    streamstate::AggregateStore view(kThreads);
    view.restore(store.snapshot());
    ++taken;
    for (int t = 0; t < kThreads; ++t) {
      const auto first = view.get_partial(name("t", t, "k", 0), static_cast<std::uint32_t>(t));
      for (int i = 1; i < kWidth; ++i) {
        if (view.get_partial(name("t", t, "k", i), static_cast<std::uint32_t>(t)) != first) {
          ++torn;
        }
      }
    }
  } while (running.load() > 0);
  for (auto& w : workers) w.join();
  CHECK(torn == 0);
  CHECK(taken > 0);
  CHECK(store.size() == static_cast<std::size_t>(kThreads * kWidth));
}

// The epoch lock prefers its exclusive side: once a snapshot waits, new publishers are held
// back instead of starving it.
void test_epoch_lock_prefers_writers() {
  streamstate::EpochLock lock;
  lock.lock_shared();
  std::atomic<bool> acquired{false};
  std::thread writer([&] {
    lock.lock();
    acquired = true;
    lock.unlock();
  });
  bool held_back = false;
  for (int i = 0; i < 10000000 && !held_back; ++i) {
    if (lock.try_lock_shared()) {
      lock.unlock_shared();
      std::this_thread::yield();
    } else {
      held_back = true;
    }
  }
  CHECK(held_back && !acquired);
  lock.unlock_shared();
  writer.join();
  CHECK(acquired);
  const streamstate::SharedEpoch again(lock);  // free again for readers
  CHECK(again.owns_lock());
}

void test_moments_merge_precision() {
  // 1e9 + small noise split over partials: the merged variance matches a two-pass one.
  std::mt19937_64 rng(7);
  std::normal_distribution<double> noise(0.0, 1e-3);
  std::vector<double> values(3000);
  for (double& v : values) v = 1e9 + noise(rng);
  Moments parts[3];
  for (std::size_t i = 0; i < values.size(); ++i) parts[i % 3].add(values[i]);
  Moments merged = parts[2];
  merged.merge(parts[0]);
  merged.merge(parts[1]);
  double mean = 0.0;
  for (const double v : values) mean += v;
  mean /= static_cast<double>(values.size());
  double m2 = 0.0;
  for (const double v : values) m2 += (v - mean) * (v - mean);
  const double two_pass = m2 / static_cast<double>(values.size() - 1);
  CHECK(std::fabs(merged.var() - two_pass) <= 1e-6 * two_pass);
  CHECK(merged.count == values.size());
}

void test_numeric_store() {
  using Store = streamstate::NumericAggregateStore<streamstate::Int64Keys>;
  Store store(2, streamstate::NanPolicy::kSkip);
  const std::vector<std::int64_t> keys = {1, 2, 1, 3};
  const std::vector<double> values = {1.0, 2.0, 3.0, std::nan("")};
  store.fold(0, keys.data(), values.data(), keys.size());
  CHECK(!store.result(1).has_value());
  CHECK(store.publish(0) == 2);  // key 3 only saw NaN: skipped, never created
  CHECK(store.publish(0) == 0);
  const std::vector<std::int64_t> more = {1};
  const std::vector<double> more_values = {5.0};
  store.fold(1, more.data(), more_values.data(), 1);
  store.publish(1);
  const auto r = store.result(1);
  CHECK(r.has_value() && r->count == 3 && r->sum == 9.0 && r->min == 1.0 && r->max == 5.0);
  CHECK(r.has_value() && std::fabs(r->var() - 4.0) < 1e-12);

  streamstate::Int64Keys::KeyColumn column;
  streamstate::StatArrays stats;
  store.result_columns(column, stats);
  CHECK(column.size() == 2 && stats.size == 2);
  for (std::size_t i = 0; i < stats.size; ++i) {
    const auto expected = store.result(column.keys[i]);
    CHECK(expected && static_cast<std::uint64_t>(stats.count[i]) == expected->count && stats.sum[i] == expected->sum &&
          stats.mean[i] == expected->mean());
  }

  // Unpublished local state survives a snapshot.
  store.fold(1, more.data(), more_values.data(), 1);
  const std::string snap = store.snapshot();
  Store restored(2, streamstate::NanPolicy::kSkip);
  restored.restore(snap);
  CHECK(restored.snapshot() == snap);
  CHECK(restored.partition_pending(1) == 1 && restored.partition_size(0) == 2);
  restored.publish(1);
  CHECK(restored.result(1)->count == 4);

  // Raise policy: nothing folded from a batch with NaN.
  Store strict(1, streamstate::NanPolicy::kRaise);
  bool raised = false;
  try {
    strict.fold(0, keys.data(), values.data(), keys.size());
  } catch (const streamstate::InvalidArgument&) {
    raised = true;
  }
  CHECK(raised && strict.partition_size(0) == 0);

  // Foreign or damaged snapshots are refused and change nothing.
  streamstate::NumericAggregateStore<streamstate::BytesKeys> bytes_store(2,
                                                                         streamstate::NanPolicy::kSkip);
  CHECK(throws_corrupt([&] { bytes_store.restore(snap); }));
  std::string damaged = snap;
  damaged[damaged.size() - 9] ^= 1;
  CHECK(throws_corrupt([&] { restored.restore(damaged); }));
  CHECK(restored.result(1)->count == 4);
}

void test_numeric_store_big_batches() {
  // Enough keys that later batches are folded shard by shard (scatter path).
  using Store = streamstate::NumericAggregateStore<streamstate::Int64Keys>;
  Store store(1, streamstate::NanPolicy::kSkip);
  // The same rows folded with their hashes given (as routing gives them), row by row and
  // scattered alike: the same state, byte for byte.
  Store hashed(1, streamstate::NanPolicy::kSkip);
  std::mt19937_64 rng(3);
  std::vector<std::int64_t> keys(600000);
  std::vector<std::uint64_t> hashes(keys.size());
  std::vector<double> values(keys.size());
  std::unordered_map<std::int64_t, std::pair<std::uint64_t, double>> reference;
  for (int round = 0; round < 3; ++round) {
    for (std::size_t i = 0; i < keys.size(); ++i) {
      keys[i] = static_cast<std::int64_t>(rng() % 450000);
      hashes[i] = streamstate::Int64Keys::hash(keys[i]);
      values[i] = (i % 1000 == 7) ? std::nan("") : static_cast<double>(rng() % 1000);
      if (!std::isnan(values[i])) {
        auto& r = reference[keys[i]];
        ++r.first;
        r.second += values[i];
      }
    }
    store.fold(0, keys.data(), values.data(), keys.size());
    hashed.fold(0, keys.data(), values.data(), keys.size(), hashes.data());
  }
  CHECK(hashed.snapshot() == store.snapshot());
  CHECK(store.partition_size(0) == reference.size());
  store.publish(0);
  CHECK(store.size() == reference.size());
  std::size_t wrong = 0;
  for (const auto& [key, r] : reference) {
    const auto m = store.result(key);
    if (!m || m->count != r.first || m->sum != r.second) ++wrong;
  }
  CHECK(wrong == 0);
  const std::string snap = store.snapshot();
  Store restored(1, streamstate::NanPolicy::kSkip);
  restored.restore(snap);
  CHECK(restored.snapshot() == snap);
}

void test_numeric_store_threads() {
  using Store = streamstate::NumericAggregateStore<streamstate::Int64Keys>;
  constexpr std::uint32_t kThreads = 4;
  Store store(kThreads, streamstate::NanPolicy::kSkip);
  std::vector<std::thread> workers;
  std::atomic<int> running{kThreads};
  for (std::uint32_t t = 0; t < kThreads; ++t) {
    workers.emplace_back([&store, &running, t] {
      std::vector<std::int64_t> keys(500);
      std::vector<double> values(500, 1.0);
      for (std::size_t i = 0; i < keys.size(); ++i) keys[i] = static_cast<std::int64_t>(t * 1000 + i);
      for (int b = 0; b < 100; ++b) {
        store.fold(t, keys.data(), values.data(), keys.size());
        store.publish(t);
      }
      --running;
    });
  }
  do {
    Store view(kThreads, streamstate::NanPolicy::kSkip);
    view.restore(store.snapshot());
    streamstate::Int64Keys::KeyColumn column;
    streamstate::StatArrays stats;
    view.result_columns(column, stats);
    // Each partition's publish is whole: all its keys share one count.
    std::uint64_t counts[kThreads] = {};
    for (std::size_t i = 0; i < stats.size; ++i) {
      const auto owner = static_cast<std::size_t>(column.keys[i] / 1000);
      if (counts[owner] == 0) counts[owner] = static_cast<std::uint64_t>(stats.count[i]);
      CHECK(counts[owner] == static_cast<std::uint64_t>(stats.count[i]));
    }
  } while (running.load() > 0);
  for (auto& w : workers) w.join();
  CHECK(store.size() == kThreads * 500);
  CHECK(store.result(1234)->count == 100);
}

// Several value columns: each folded as if alone, captured and restored with its names,
// and joined from one-column snapshots; partitions fold and publish from their own threads
// while another thread captures.
void test_numeric_store_columns() {
  using Store = streamstate::NumericAggregateStore<streamstate::BytesKeys>;
  const std::vector<std::string> names = {"dep", "arr", "air"};
  constexpr std::uint32_t kThreads = 2;
  Store wide(kThreads, streamstate::NanPolicy::kSkip, names);
  std::vector<std::unique_ptr<Store>> singles;
  std::vector<std::string> keys(300);
  std::vector<std::string_view> views;
  for (std::size_t i = 0; i < keys.size(); ++i) keys[i] = "route-" + std::to_string(i % 37);
  for (const auto& k : keys) views.push_back(k);
  std::vector<double> block(keys.size() * names.size());
  for (std::size_t i = 0; i < block.size(); ++i) {
    block[i] = (i % 7 == 3) ? std::nan("") : static_cast<double>(i % 11) - 5.0;
  }
  std::vector<std::thread> workers;
  std::atomic<int> running{kThreads};
  for (std::uint32_t t = 0; t < kThreads; ++t) {
    workers.emplace_back([&, t] {
      for (int b = 0; b < 20; ++b) {
        wide.fold(t, views.data(), block.data(), views.size());
        if (b % 3 == 0) wide.publish(t);
      }
      --running;
    });
  }
  do {
    Store view(kThreads, streamstate::NanPolicy::kSkip, names);
    view.restore(wide.snapshot());
  } while (running.load() > 0);
  for (auto& w : workers) w.join();

  for (std::size_t c = 0; c < names.size(); ++c) {
    singles.push_back(std::make_unique<Store>(kThreads, streamstate::NanPolicy::kSkip));
    std::vector<double> column(keys.size());
    for (std::size_t i = 0; i < keys.size(); ++i) column[i] = block[i * names.size() + c];
    for (std::uint32_t t = 0; t < kThreads; ++t) {
      for (int b = 0; b < 20; ++b) {
        singles[c]->fold(t, views.data(), column.data(), views.size());
        if (b % 3 == 0) singles[c]->publish(t);
      }
    }
  }
  // Joined from one-column snapshots (local partials included), the same store.
  Store joined(kThreads, streamstate::NanPolicy::kSkip, names);
  std::vector<std::string> parts;
  for (auto& single : singles) parts.push_back(single->snapshot());
  joined.restore_columns(std::vector<std::string_view>(parts.begin(), parts.end()));
  CHECK(joined.size() == wide.size() && joined.partition_pending(0) == wide.partition_pending(0));
  for (std::uint32_t t = 0; t < kThreads; ++t) {
    wide.publish(t);
    joined.publish(t);
    for (auto& single : singles) single->publish(t);
  }
  const auto same = [](const auto& a, const auto& b) {
    return a && b && a->count == b->count && a->sum == b->sum && a->min == b->min &&
           a->max == b->max && a->mean() == b->mean();
  };
  for (std::size_t c = 0; c < names.size(); ++c) {
    for (const auto& k : keys) {
      CHECK(same(wide.result(k, c), singles[c]->result(k)));
      CHECK(same(joined.result(k, c), singles[c]->result(k)));
    }
  }
  // A snapshot names its columns; a delta continues it.
  const std::string snap = wide.snapshot();
  Store copy(kThreads, streamstate::NanPolicy::kSkip, names);
  copy.restore(snap);
  wide.fold(1, views.data(), block.data(), 5);
  copy.apply_delta(wide.snapshot_delta());
  CHECK(copy.snapshot() == wide.snapshot());
  Store other(kThreads, streamstate::NanPolicy::kSkip, {"dep", "arr"});
  CHECK(throws_corrupt([&] { other.restore(snap); }));
  Store plain(kThreads, streamstate::NanPolicy::kSkip);
  CHECK(throws_corrupt([&] { plain.restore(snap); }));
  CHECK(throws_corrupt([&] { wide.restore(parts[0]); }));
  CHECK(plain.size() == 0 && other.size() == 0);
}

void test_numeric_store_deltas() {
  using Store = streamstate::NumericAggregateStore<streamstate::Int64Keys>;
  constexpr std::uint32_t kThreads = 3;
  Store store(kThreads, streamstate::NanPolicy::kSkip);
  const std::string base = store.snapshot();
  Store replica(kThreads, streamstate::NanPolicy::kSkip);
  replica.restore(base);
  CHECK(replica.identity() == store.identity() && replica.sequence() == 0);

  // Partitions fold and publish while the main thread chains deltas into the replica.
  std::vector<std::thread> workers;
  std::atomic<int> running{kThreads};
  for (std::uint32_t t = 0; t < kThreads; ++t) {
    workers.emplace_back([&store, &running, t] {
      std::vector<std::int64_t> keys(300);
      std::vector<double> values(300, 1.0);
      for (std::size_t i = 0; i < keys.size(); ++i) keys[i] = static_cast<std::int64_t>(t * 1000 + i);
      for (int b = 0; b < 200; ++b) {
        store.fold(t, keys.data(), values.data(), keys.size());
        if (b % 3 != 2) store.publish(t);  // some batches stay local across a delta
      }
      --running;
    });
  }
  std::vector<std::string> chain;
  do {
    chain.push_back(store.snapshot_delta());
    replica.apply_delta(chain.back());
    streamstate::Int64Keys::KeyColumn column;
    streamstate::StatArrays stats;
    replica.result_columns(column, stats);
    std::uint64_t counts[kThreads] = {};
    for (std::size_t i = 0; i < stats.size; ++i) {
      const auto owner = static_cast<std::size_t>(column.keys[i] / 1000);
      if (counts[owner] == 0) counts[owner] = static_cast<std::uint64_t>(stats.count[i]);
      CHECK(counts[owner] == static_cast<std::uint64_t>(stats.count[i]));  // a publish is in a delta whole or not at all
    }
  } while (running.load() > 0);
  for (auto& w : workers) w.join();
  chain.push_back(store.snapshot_delta());
  replica.apply_delta(chain.back());
  CHECK(replica.sequence() == chain.size() && replica.identity() == store.identity());

  // The chain replays from the base; a delta out of order is refused and changes nothing.
  Store again(kThreads, streamstate::NanPolicy::kSkip);
  again.restore(base);
  if (chain.size() >= 2) CHECK(throws_corrupt([&] { again.apply_delta(chain[1]); }));
  for (const std::string& d : chain) again.apply_delta(d);
  std::string damaged = chain.back();
  damaged[damaged.size() / 2] ^= 0x10;
  const std::string before = again.snapshot();
  again.restore(before);
  CHECK(throws_corrupt([&] { again.apply_delta(damaged); }));
  CHECK(again.snapshot() == before);
  CHECK(replica.snapshot() == store.snapshot() && before == store.snapshot());
  CHECK(store.result(1005)->count == 200);

  // Nothing changed: a delta of a few dozen bytes.
  CHECK(store.snapshot_delta().size() < 100);
}

void test_opaque_store_deltas() {
  streamstate::AggregateStore store(2);
  const std::string base = store.snapshot();
  streamstate::AggregateStore replica(2);
  replica.restore(base);
  std::vector<std::thread> workers;
  std::atomic<int> running{2};
  for (std::uint32_t t = 0; t < 2; ++t) {
    workers.emplace_back([&store, &running, t] {
      std::vector<std::string> owned;
      for (int i = 0; i < 40; ++i) owned.push_back(name("t", t, "k", i));
      const std::vector<std::string_view> keys(owned.begin(), owned.end());
      for (int b = 0; b < 300; ++b) {
        const std::string value = std::to_string(b);
        const std::vector<std::string_view> values(keys.size(), value);
        store.publish_many(t, keys, values);
        if (b % 100 == 99) store.remove_group(keys[0]);
      }
      --running;
    });
  }
  std::vector<std::string> chain;
  do {
    chain.push_back(store.snapshot_delta());
    replica.apply_delta(chain.back());
    for (std::uint32_t t = 0; t < 2; ++t) {
      const auto first = replica.get_partial(name("t", t, "k", 1), t);
      for (int i = 2; i < 40; ++i) CHECK(replica.get_partial(name("t", t, "k", i), t) == first);
    }
  } while (running.load() > 0);
  for (auto& w : workers) w.join();
  chain.push_back(store.snapshot_delta());
  replica.apply_delta(chain.back());
  CHECK(replica.snapshot() == store.snapshot());
  CHECK(!replica.get_partial("t0k0", 0).has_value() || store.get_partial("t0k0", 0).has_value());
  streamstate::AggregateStore again(2);
  again.restore(base);
  CHECK(throws_corrupt([&] { again.apply_delta(chain.back()); }) || chain.size() == 1);
  CHECK(again.size() == 0);
}

// Rescaling: each key's partials (published and local, from every partition) end up in
// one slot of the partition it routes to, with the results of the source after a publish;
// repartitioned() runs while partitions fold and publish from their own threads.
void test_numeric_store_repartition() {
  using Store = streamstate::NumericAggregateStore<streamstate::Int64Keys>;
  constexpr std::uint32_t kThreads = 3;
  constexpr std::uint32_t kRescaled = 5;
  Store store(kThreads, streamstate::NanPolicy::kSkip);
  std::vector<std::thread> workers;
  std::atomic<int> running{kThreads};
  for (std::uint32_t t = 0; t < kThreads; ++t) {
    workers.emplace_back([&store, &running, t] {
      // Overlapping keys: every key is folded by every partition.
      std::vector<std::int64_t> keys(300);
      std::vector<double> values(300);
      for (std::size_t i = 0; i < keys.size(); ++i) {
        keys[i] = static_cast<std::int64_t>(i);
        values[i] = static_cast<double>(t + 1) * 0.5;
      }
      for (int b = 0; b < 60; ++b) {
        store.fold(t, keys.data(), values.data(), keys.size());
        // Partitions publish at different times.
        if (static_cast<std::uint32_t>(b % 3) == t) store.publish(t);
      }
      --running;
    });
  }
  do {
    const auto rescaled = store.repartitioned(kRescaled);
    // Folds are whole, so every partition's rows of a key count alike.
    const auto first = rescaled->result(0);
    for (std::int64_t k = 0; k < 300; k += 37) {
      const auto m = rescaled->result(k);
      CHECK(m.has_value() == first.has_value() && (!m || m->count == first->count));
      if (m) CHECK(rescaled->partitions_holding(k) == std::vector<std::uint32_t>{
                       streamstate::partition_of<streamstate::Int64Keys>(k, kRescaled)});
    }
  } while (running.load() > 0);
  for (auto& w : workers) w.join();

  const auto rescaled = store.repartitioned(kRescaled);
  CHECK(rescaled->num_partitions() == kRescaled && rescaled->identity() == 0);
  CHECK(store.partitions_holding(7).size() == kThreads);
  std::size_t held = 0;
  for (std::uint32_t p = 0; p < kRescaled; ++p) {
    CHECK(rescaled->partition_pending(p) == 0);
    held += rescaled->partition_size(p);
  }
  CHECK(held == 300 && rescaled->size() == 300);
  for (std::uint32_t t = 0; t < kThreads; ++t) store.publish(t);
  for (std::int64_t k = 0; k < 300; ++k) {
    const auto want = store.result(k);
    const auto got = rescaled->result(k);
    CHECK(got && want && got->count == 180 && got->count == want->count &&
          got->sum == want->sum && got->min == want->min && got->max == want->max &&
          got->var() == want->var());
  }
  Store busy(2, streamstate::NanPolicy::kSkip);
  const std::int64_t one = 1;
  const double value = 1.0;
  busy.fold(1, &one, &value, 1);
  bool refused = false;
  try {
    store.repartition_into(busy);
  } catch (const streamstate::InvalidArgument&) {
    refused = true;
  }
  CHECK(refused && busy.size() == 0 && busy.partition_pending(1) == 1);
}

// Snapshots sectioned by key group: exports of some partitions and full snapshots restore
// into stores of other partition counts, each new partition keeping the keys of its
// groups; exports of partitions 0, 1, ... merged in order equal the published reads bit
// for bit, and a section's damage is found only where it is decoded.
void test_numeric_store_key_group_sections() {
  using Store = streamstate::NumericAggregateStore<streamstate::BytesKeys>;
  constexpr std::uint32_t kGroups = 16;
  Store store(3, streamstate::NanPolicy::kSkip, {}, kGroups);
  std::vector<std::string> names;
  for (int i = 0; i < 500; ++i) names.push_back(name("key-", i));
  std::vector<std::string_view> keys(names.begin(), names.end());
  std::vector<double> values(keys.size());
  for (std::uint32_t p = 0; p < 3; ++p) {
    for (std::size_t i = 0; i < values.size(); ++i) values[i] = 0.25 * static_cast<double>(i + p);
    store.fold(p, keys.data(), values.data(), keys.size());  // every key in every partition
    if (p != 1) store.publish(p);                           // partition 1 stays local
  }
  const std::string full = store.snapshot();
  std::vector<std::string> exports;
  for (std::uint32_t p = 0; p < 3; ++p) exports.push_back(store.snapshot_partitions({p}));
  const std::vector<std::string_view> parts(exports.begin(), exports.end());

  Store whole(3, streamstate::NanPolicy::kSkip, {}, kGroups);
  whole.restore(full);
  for (std::uint32_t p = 0; p < 3; ++p) whole.publish(p);
  for (const std::uint32_t after : {1U, 2U, 5U, 16U}) {
    Store merged(after, streamstate::NanPolicy::kSkip, {}, kGroups);
    merged.restore_from(parts, std::nullopt);
    Store owned(after, streamstate::NanPolicy::kSkip, {}, kGroups);
    owned.restore_from({full}, std::vector<std::uint32_t>{after - 1});
    std::size_t kept = 0;
    for (const std::string_view key : keys) {
      const auto want = whole.result(key);
      const auto got = merged.result(key);
      CHECK(got && want && got->count == want->count && got->sum == want->sum &&
            got->var() == want->var());
      const std::uint32_t owner = streamstate::partition_of<streamstate::BytesKeys>(key, after, kGroups);
      CHECK(merged.partitions_holding(key) == std::vector<std::uint32_t>{owner});
      const streamstate::KeyGroupRange range = streamstate::key_group_range(owner, after, kGroups);
      const std::uint32_t group = streamstate::key_group_of<streamstate::BytesKeys>(key, kGroups);
      CHECK(group >= range.first && group < range.end);
      const bool mine = owner == after - 1;
      CHECK(owned.result(key).has_value() == mine);
      kept += mine ? 1 : 0;
    }
    CHECK(owned.size() == kept && kept > 0);
  }
  // Other key groups are refused, and leave the store as it was.
  Store other(2, streamstate::NanPolicy::kSkip, {}, 32);
  bool refused = false;
  try {
    other.restore_from({full}, std::nullopt);
  } catch (const streamstate::InvalidArgument&) {
    refused = true;
  }
  CHECK(refused && other.size() == 0);
  // A truncated or flipped artifact: CorruptDataError, nothing changed.
  Store target(2, streamstate::NanPolicy::kSkip, {}, kGroups);
  target.restore_from({full}, std::nullopt);
  const std::string before = target.snapshot();
  std::string flipped = full;
  flipped[flipped.size() / 2] = static_cast<char>(flipped[flipped.size() / 2] ^ 0x10);
  CHECK(throws_corrupt([&] { target.restore_from({parts[0], flipped}, std::nullopt); }));
  CHECK(throws_corrupt([&] { target.restore_from({full.substr(0, full.size() - 9)}, std::nullopt); }));
  CHECK(target.snapshot() == before);
}

}  // namespace

int main() {
  test_int64_flat_table();
  test_bytes_flat_table();
  test_opaque_store();
  test_opaque_store_threads_and_snapshots();
  test_epoch_lock_prefers_writers();
  test_moments_merge_precision();
  test_numeric_store();
  test_numeric_store_big_batches();
  test_numeric_store_threads();
  test_numeric_store_columns();
  test_numeric_store_deltas();
  test_opaque_store_deltas();
  test_numeric_store_repartition();
  test_numeric_store_key_group_sections();
  return check_summary("test_aggregate_store");
}
