// Unit tests for the keyed state backend core (plain executable; non-zero exit on failure).
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "core/byte_io.h"
#include "core/checksum.h"
#include "core/errors.h"
#include "core/record_codec.h"
#include "core/state_backend.h"

#include "check.h"

using streamstate::CorruptDataError;
using streamstate::InMemoryStateBackend;
using streamstate::kNeverExpires;
using streamstate::RecordKind;
using streamstate::RecordWriter;
using streamstate::StateBackendOptions;
using streamstate::test::check_failures;
using streamstate::test::check_summary;
using streamstate::test::throws_corrupt;

namespace {

constexpr double kNow = 1000.0;

using Model = std::map<std::string, std::string>;

std::vector<std::pair<std::string, std::string>> scan(const InMemoryStateBackend& b,
                                                      std::string_view prefix,
                                                      double now = kNow) {
  std::vector<std::pair<std::string, std::string>> out;
  b.range_scan(prefix, now, [&out](std::string_view k, std::string_view v) {
    out.emplace_back(std::string(k), std::string(v));
  });
  return out;
}

std::vector<std::pair<std::string, std::string>> model_scan(const Model& m, std::string_view prefix) {
  std::vector<std::pair<std::string, std::string>> out;
  for (auto it = m.lower_bound(std::string(prefix)); it != m.end() && it->first.starts_with(prefix);
       ++it) {
    out.emplace_back(*it);
  }
  return out;
}

StateBackendOptions small(std::size_t unsorted_tail_limit) {
  StateBackendOptions options;
  options.unsorted_tail_limit = unsorted_tail_limit;
  return options;
}

// ---- the reference design's behaviours ---------------------------------------------------

void test_put_get_delete() {
  InMemoryStateBackend b;
  b.put("hello", "world");
  CHECK(b.get("hello", kNow) == std::optional<std::string>("world"));
  CHECK(b.erase("hello", kNow));
  CHECK(!b.get("hello", kNow).has_value());
  CHECK(!b.erase("missing", kNow));
  b.put("", "empty key");
  CHECK(b.get("", kNow) == std::optional<std::string>("empty key"));
}

void test_range_scan_sorted_and_bounded() {
  InMemoryStateBackend b;
  b.put("ns:b", "2");
  b.put("other:c", "3");
  b.put("ns:a", "1");
  b.put("ns", "0");
  b.put("nt", "x");
  const auto got = scan(b, "ns:");
  CHECK(got.size() == 2);
  CHECK(got[0].first == "ns:a" && got[1].first == "ns:b");
  CHECK(scan(b, "").size() == 5);
  // A prefix ending in 0xff has no successor byte: the scan must run to the end.
  b.put(std::string("\xff\xff", 2), "top");
  b.put(std::string("\xff\xff\x01", 3), "top2");
  CHECK(scan(b, std::string("\xff", 1)).size() == 2);
}

void test_checkpoint_restore_after_mutation() {
  InMemoryStateBackend b;
  b.put("k1", "v1");
  b.put("k2", "v2");
  const std::string snapshot = b.checkpoint(42, kNow);
  b.erase("k1", kNow);
  b.put("k2", "changed");
  b.put("k3", "new");
  CHECK(b.restore(snapshot) == 42);
  CHECK(b.get("k1", kNow) == std::optional<std::string>("v1"));
  CHECK(b.get("k2", kNow) == std::optional<std::string>("v2"));
  CHECK(!b.get("k3", kNow).has_value());
  CHECK(b.size() == 2);
}

void test_size_bytes_and_version() {
  InMemoryStateBackend b;
  CHECK(b.size_bytes() == 0);
  const auto v0 = b.version();
  b.put("abc", "def");
  CHECK(b.size_bytes() == 6);
  const auto v1 = b.version();
  CHECK(v1 > v0);
  b.put("abc", "longer value");
  CHECK(b.size_bytes() == 15);
  b.erase("abc", kNow);
  CHECK(b.version() > v1);
  CHECK(b.size_bytes() == 0);
  const auto v2 = b.version();
  CHECK(!b.erase("abc", kNow));
  CHECK(b.version() == v2);  // nothing changed, no bump
}

void test_empty_round_trip_and_short_input() {
  InMemoryStateBackend b;
  const std::string snapshot = b.checkpoint(0, kNow);
  InMemoryStateBackend fresh;
  CHECK(fresh.restore(snapshot) == 0);
  CHECK(fresh.size_bytes() == 0 && fresh.size() == 0);
  CHECK(throws_corrupt([&] { fresh.restore("short"); }));
}

// ---- corrupt input leaves the backend exactly as it was -----------------------------------

void test_corrupt_restore_is_atomic() {
  InMemoryStateBackend source;
  source.put("a", "1");
  source.put("b", "22", 5000.0);
  const std::string snapshot = source.checkpoint(7, kNow);

  InMemoryStateBackend target;
  target.put("keep", "me");
  const auto before = scan(target, "");
  const auto version = target.version();
  for (std::size_t i = 0; i < snapshot.size(); ++i) {
    std::string flipped = snapshot;
    flipped[i] = static_cast<char>(flipped[i] ^ 0x40);
    CHECK(throws_corrupt([&] { target.restore(flipped); }));
  }
  for (std::size_t n = 0; n < snapshot.size(); ++n) {
    CHECK(throws_corrupt([&] { target.restore(snapshot.substr(0, n)); }));
  }
  CHECK(scan(target, "") == before);
  CHECK(target.version() == version);
}

void test_semantically_bad_snapshots() {
  const auto header = [](std::uint32_t layout) {
    std::string v(12, '\0');
    v[8] = static_cast<char>(layout);
    return v;
  };
  const auto build = [](RecordKind kind, const std::vector<std::pair<std::string, std::string>>& recs) {
    RecordWriter w(kind);
    for (const auto& [k, v] : recs) w.add(k, v);
    return std::move(w).finish();
  };
  const std::string plain(1, '\0');
  InMemoryStateBackend b;
  b.put("x", "y");
  // Foreign kind, missing header, wrong layout, keys out of order or repeated, bad flags,
  // truncated expiry, NaN expiry: all checksum-valid, all rejected.
  CHECK(throws_corrupt([&] { b.restore(build(RecordKind::kAggregateStore, {{"state_backend", header(1)}})); }));
  CHECK(throws_corrupt([&] { b.restore(build(RecordKind::kStateBackend, {})); }));
  CHECK(throws_corrupt([&] { b.restore(build(RecordKind::kStateBackend, {{"state_backend", header(2)}})); }));
  CHECK(throws_corrupt([&] {
    b.restore(build(RecordKind::kStateBackend, {{"state_backend", header(1)}, {"b", plain + "1"}, {"a", plain + "2"}}));
  }));
  CHECK(throws_corrupt([&] {
    b.restore(build(RecordKind::kStateBackend, {{"state_backend", header(1)}, {"a", plain}, {"a", plain}}));
  }));
  CHECK(throws_corrupt([&] {
    b.restore(build(RecordKind::kStateBackend, {{"state_backend", header(1)}, {"a", std::string("\x02", 1)}}));
  }));
  CHECK(throws_corrupt([&] {
    b.restore(build(RecordKind::kStateBackend, {{"state_backend", header(1)}, {"a", std::string("\x01\x00\x00", 3)}}));
  }));
  CHECK(throws_corrupt([&] {
    b.restore(build(RecordKind::kStateBackend, {{"state_backend", header(1)}, {"a", ""}}));
  }));
  std::string nan_expiry("\x01\x00\x00\x00\x00\x00\x00\xf8\x7f", 9);
  CHECK(throws_corrupt([&] {
    b.restore(build(RecordKind::kStateBackend, {{"state_backend", header(1)}, {"a", nan_expiry}}));
  }));
  // Checksum-valid containers whose record count and lengths disagree with their bytes:
  // the single-pass reader must catch what RecordReader catches.
  const auto seal = [](std::uint32_t count, const std::string& records) {
    std::string out("SSRC", 4);
    streamstate::put_u16(out, streamstate::kRecordFormatVersion);
    streamstate::put_u16(out, static_cast<std::uint16_t>(RecordKind::kStateBackend));
    streamstate::put_u32(out, count);
    out += records;
    streamstate::put_u32(out, streamstate::crc32c_mask(streamstate::crc32c(out)));
    return out;
  };
  const auto rec = [](std::string_view k, std::string_view v) {
    std::string out;
    streamstate::put_u32(out, static_cast<std::uint32_t>(k.size()));
    out += k;
    streamstate::put_u32(out, static_cast<std::uint32_t>(v.size()));
    out += v;
    return out;
  };
  const std::string head = rec("state_backend", header(1));
  const std::string one = rec("a", plain + "1");
  CHECK(!throws_corrupt([&] { InMemoryStateBackend().restore(seal(2, head + one)); }));
  CHECK(throws_corrupt([&] { b.restore(seal(2, head + one + "junk")); }));       // trailing bytes
  CHECK(throws_corrupt([&] { b.restore(seal(3, head + one)); }));                // too few records
  CHECK(throws_corrupt([&] { b.restore(seal(1, head + one)); }));                // too many
  CHECK(throws_corrupt([&] { b.restore(seal(1000, head)); }));                   // impossible count
  std::string long_length = rec("a", plain + "1");
  long_length[8] = '\x7f';  // the value length's high byte: far past the end
  CHECK(throws_corrupt([&] { b.restore(seal(2, head + long_length)); }));
  CHECK(b.get("x", kNow) == std::optional<std::string>("y"));
  CHECK(b.size() == 1);
}

// ---- TTL ------------------------------------------------------------------------------

void test_expiry() {
  InMemoryStateBackend b;
  b.put("forever", "1");
  b.put("soon", "2", 1010.0);
  b.put("later", "3", 2000.0);
  CHECK(b.get("soon", 1009.0).has_value());
  CHECK(!b.get("soon", 1010.0).has_value());  // expires_at <= now: gone
  CHECK(scan(b, "", 1500.0).size() == 2);
  InMemoryStateBackend restored;
  restored.restore(b.checkpoint(1, 1500.0));
  CHECK(restored.size() == 2);  // "soon" was dropped from the checkpoint
  CHECK(restored.get("later", 1999.0) == std::optional<std::string>("3"));
  CHECK(!restored.get("later", 2000.0).has_value());
  CHECK(b.size() == 3);  // still stored until purged
  CHECK(b.purge_expired(1500.0) == 1);
  CHECK(b.size() == 2);
  // An expired entry counts as absent for compare-and-set, and its slot is reused.
  CHECK(b.compare_and_set("later", std::nullopt, "fresh", kNeverExpires, 3000.0));
  CHECK(b.get("later", 3000.0) == std::optional<std::string>("fresh"));
  bool threw = false;
  try {
    b.put("bad", "x", -std::numeric_limits<double>::infinity());
  } catch (const std::invalid_argument&) {
    threw = true;
  }
  CHECK(threw);
}

// ---- model-based random operations across every structural path -------------------------

std::string random_key(std::mt19937_64& rng) {
  // A small alphabet with shared prefixes, 0x00 and 0xff bytes, and long common prefixes
  // (namespaced keys) to drive the chunked sort through its refinement and padding cases.
  static const std::vector<std::string> parts = {
      "", "a", "b", std::string(1, '\0'), std::string(1, '\xff'), "ab", "operator-id/partition-7/"};
  std::string key;
  const auto n = rng() % 5;
  for (std::uint64_t i = 0; i < n; ++i) key += parts[rng() % parts.size()];
  return key;
}

void test_random_operations_against_model() {
  for (std::uint64_t seed = 0; seed < 40; ++seed) {
    std::mt19937_64 rng(seed);
    const std::size_t limit = std::vector<std::size_t>{1, 2, 3, 16}[seed % 4];
    auto b = std::make_unique<InMemoryStateBackend>(small(limit));
    Model model;
    for (int step = 0; step < 400; ++step) {
      const auto op = rng() % 100;
      if (op < 30) {
        const std::string k = random_key(rng);
        const std::string v = random_key(rng);
        b->put(k, v);
        model[k] = v;
      } else if (op < 40) {
        const std::string k = random_key(rng);
        CHECK(b->erase(k, kNow) == (model.erase(k) == 1));
      } else if (op < 55) {
        std::vector<std::string> ks(rng() % 40);
        std::vector<std::string> vs(ks.size());
        for (std::size_t i = 0; i < ks.size(); ++i) {
          ks[i] = random_key(rng);
          vs[i] = random_key(rng);
        }
        std::vector<std::string_view> kv(ks.begin(), ks.end());
        std::vector<std::string_view> vv(vs.begin(), vs.end());
        b->put_many(kv, vv);
        for (std::size_t i = 0; i < ks.size(); ++i) model[ks[i]] = vs[i];
      } else if (op < 62) {
        const std::string p = random_key(rng);
        std::size_t expected = 0;
        for (auto it = model.lower_bound(p); it != model.end() && it->first.starts_with(p);) {
          it = model.erase(it);
          ++expected;
        }
        CHECK(b->erase_prefix(p, kNow) == expected);
      } else if (op < 72) {
        const std::string k = random_key(rng);
        const auto found = model.find(k);
        std::optional<std::string> expected;
        if (rng() % 4 != 0) {
          if (found != model.end()) expected = found->second;
        } else {
          expected = random_key(rng);
        }
        const std::optional<std::string> desired =
            rng() % 5 == 0 ? std::nullopt : std::optional<std::string>(random_key(rng));
        const bool matches = expected == (found == model.end() ? std::nullopt : std::optional(found->second));
        std::optional<std::string_view> e;
        if (expected) e = *expected;
        std::optional<std::string_view> d;
        if (desired) d = *desired;
        CHECK(b->compare_and_set(k, e, d, kNeverExpires, kNow) == matches);
        if (matches) {
          if (desired) {
            model[k] = *desired;
          } else {
            model.erase(k);
          }
        }
      } else if (op < 85) {
        const std::string p = random_key(rng);
        CHECK(scan(*b, p) == model_scan(model, p));
      } else if (op < 92) {
        auto fresh = std::make_unique<InMemoryStateBackend>(small(limit));
        CHECK(fresh->restore(b->checkpoint(static_cast<std::uint64_t>(step), kNow)) ==
              static_cast<std::uint64_t>(step));
        CHECK(scan(*fresh, "") == model_scan(model, ""));
        if (rng() % 2 == 0) b = std::move(fresh);  // continue on the restored (lazy) table
      } else {
        std::vector<std::string> ks(8);
        for (auto& k : ks) k = random_key(rng);
        std::vector<std::string_view> kv(ks.begin(), ks.end());
        const auto batch = b->get_many(kv, kNow);
        std::size_t offset = 0;
        for (std::size_t i = 0; i < ks.size(); ++i) {
          const auto it = model.find(ks[i]);
          if (it == model.end()) {
            CHECK(batch.sizes[i] == streamstate::ValueBatch::kMissing);
          } else {
            CHECK(batch.sizes[i] == it->second.size());
            CHECK(batch.bytes.compare(offset, it->second.size(), it->second) == 0);
            offset += it->second.size();
          }
        }
      }
      CHECK(b->size() == model.size());
      if (check_failures() > 0) {
        std::fprintf(stderr, "  (seed %llu, step %d)\n", static_cast<unsigned long long>(seed), step);
        return;
      }
    }
    CHECK(scan(*b, "") == model_scan(model, ""));
  }
}

void test_bulk_load_then_point_and_ordered_reads() {
  // Large enough to take the unordered bulk path and the radix sort.
  InMemoryStateBackend b(small(64));
  std::mt19937_64 rng(7);
  std::vector<std::string> keys(20000);
  std::vector<std::string> values(keys.size());
  Model model;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    keys[i] = "op/" + std::to_string(rng() % 15000);  // repeats: the last one wins
    values[i] = std::to_string(i);
    model[keys[i]] = values[i];
  }
  std::vector<std::string_view> kv(keys.begin(), keys.end());
  std::vector<std::string_view> vv(values.begin(), values.end());
  b.put_many(kv, vv);
  CHECK(b.size() == model.size());
  for (const auto& [k, v] : model) CHECK(b.get(k, kNow) == std::optional<std::string>(v));
  CHECK(scan(b, "op/1") == model_scan(model, "op/1"));
  CHECK(scan(b, "") == model_scan(model, ""));
}

// (Built with append, not operator+: GCC 12 at -O3 raises a false -Wrestrict on the latter.)
std::string numbered(std::string_view prefix, int i) {
  std::string out(prefix);
  out.append(std::to_string(i));
  return out;
}

void test_restore_in_place_never_writes_the_snapshot() {
  InMemoryStateBackend source;
  for (int i = 0; i < 100; ++i) {
    source.put(numbered("k", i), numbered("v", i), i % 2 == 0 ? kNeverExpires : 5000.0);
  }
  auto snapshot = std::make_shared<const std::string>(source.checkpoint(11, kNow));
  const std::string pristine = *snapshot;
  InMemoryStateBackend b(small(4));
  CHECK(b.restore(*snapshot, snapshot) == 11);
  CHECK(snapshot.use_count() == 2);  // the backend holds it
  // Same-size overwrites, expiry changes and deletes of entries that live in the snapshot
  // must all go to the backend's own memory.
  b.put("k1", "V1");
  b.put("k2", "V2", 6000.0);
  b.put("k3", "V3");
  b.erase("k4", kNow);
  CHECK(*snapshot == pristine);
  CHECK(b.get("k1", kNow) == std::optional<std::string>("V1"));
  CHECK(b.get("k2", 5999.0) == std::optional<std::string>("V2"));
  CHECK(!b.get("k4", kNow).has_value());
  CHECK(b.get("k5", kNow) == std::optional<std::string>("v5"));
  // Enough churn to compact: the backend copies what it still needs and lets go.
  for (int i = 0; i < 200; ++i) b.put(numbered("new", i), "x");
  CHECK(snapshot.use_count() == 1);
  CHECK(b.get("k5", kNow) == std::optional<std::string>("v5"));
  CHECK(b.size() == 99 + 200);
  // Restoring over it again releases the previous snapshot as well.
  auto second = std::make_shared<const std::string>(b.checkpoint(12, kNow));
  CHECK(b.restore(*second, second) == 12);
  CHECK(second.use_count() == 2);
  CHECK(b.restore(*snapshot) == 11);  // copied, not held
  CHECK(second.use_count() == 1 && snapshot.use_count() == 1);
  CHECK(scan(b, "k").size() == 100);
}

// ---- threads ----------------------------------------------------------------------------

void test_concurrent_compare_and_set_increments() {
  InMemoryStateBackend b(small(8));
  constexpr int kThreads = 4;
  constexpr int kIncrements = 10000;
  std::vector<std::thread> threads;
  std::atomic<bool> stop_readers{false};
  std::atomic<int> reader_errors{0};
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&b, t] {
      for (int i = 0; i < kIncrements; ++i) {
        for (;;) {
          const auto current = b.get("counter", kNow);
          const long long value = current ? std::stoll(*current) : 0;
          std::optional<std::string_view> expected;
          if (current) expected = *current;
          const std::string next = std::to_string(value + 1);
          if (b.compare_and_set("counter", expected, next, kNeverExpires, kNow)) break;
        }
        // Churn new keys so merges and checkpoints race with the counter.
        b.put("churn/" + std::to_string(t) + "/" + std::to_string(i % 500), "x");
      }
    });
  }
  std::thread reader([&] {
    while (!stop_readers.load()) {
      InMemoryStateBackend copy;
      copy.restore(b.checkpoint(1, kNow));
      const auto entries = scan(copy, "churn/");
      for (std::size_t i = 1; i < entries.size(); ++i) {
        if (!(entries[i - 1].first < entries[i].first)) reader_errors.fetch_add(1);
      }
    }
  });
  for (auto& thread : threads) thread.join();
  stop_readers.store(true);
  reader.join();
  CHECK(b.get("counter", kNow) == std::optional<std::string>(std::to_string(kThreads * kIncrements)));
  CHECK(reader_errors.load() == 0);
  CHECK(scan(b, "churn/").size() == static_cast<std::size_t>(kThreads * 500));
}

// ---- deltas -----------------------------------------------------------------------------

// A delta header's sequence number (u32 layout, u64 id, u64 parent id, u32 parent identity,
// then the u64 sequence).
std::uint64_t delta_sequence(const std::string& delta) {
  streamstate::RecordReader reader(delta);
  streamstate::RecordView header;
  CHECK(reader.next(header) && header.value.size() == 40);
  return streamstate::load_u64(header.value.data() + 24);
}
std::uint32_t delta_parent(const std::string& delta) {
  streamstate::RecordReader reader(delta);
  streamstate::RecordView header;
  CHECK(reader.next(header));
  return streamstate::load_u32(header.value.data() + 20);
}

std::string replay(const std::optional<std::string>& base, const std::vector<std::string>& deltas,
                   double now) {
  InMemoryStateBackend replica;
  if (base) replica.restore(*base);
  for (const std::string& delta : deltas) replica.apply_delta(delta);
  return replica.checkpoint(1, now);
}

void test_delta_chain_random() {
  for (std::uint64_t seed = 0; seed < 30; ++seed) {
    std::mt19937_64 rng(seed);
    InMemoryStateBackend live(small(std::vector<std::size_t>{1, 2, 16}[seed % 3]));
    std::optional<std::string> base;
    std::vector<std::string> deltas;
    double now = kNow;
    const auto key = [&] { return numbered("k", static_cast<int>(rng() % 24)); };
    for (int step = 0; step < 400; ++step) {
      switch (rng() % 10) {
        case 0:
        case 1:
          live.put(key(), std::string(rng() % 4, 'v'),
                   rng() % 3 == 0 ? now + static_cast<double>(rng() % 5) : kNeverExpires);
          break;
        case 2:
          live.erase(key(), now);
          break;
        case 3:
          live.erase_prefix(numbered("k", static_cast<int>(rng() % 3)), now);
          break;
        case 4: {
          const std::string k = key();
          const auto current = live.get(k, now);
          std::optional<std::string_view> expected;
          if (current) expected = *current;
          live.compare_and_set(k, expected, std::nullopt, kNeverExpires, now);
          break;
        }
        case 5:
          now += static_cast<double>(rng() % 3);
          break;
        case 6:
          if (rng() % 4 == 0) live.purge_expired(now);
          break;
        case 7:
          base = live.checkpoint(static_cast<std::uint64_t>(step), now);
          deltas.clear();
          break;
        default:
          deltas.push_back(live.checkpoint_delta(static_cast<std::uint64_t>(step), now));
          break;
      }
    }
    deltas.push_back(live.checkpoint_delta(9999, now));
    CHECK(replay(base, deltas, now) == live.checkpoint(1, now));
  }
}

void test_delta_refuses_a_wrong_base() {
  InMemoryStateBackend live;
  live.put("a", "1");
  const std::string base = live.checkpoint(1, kNow);
  live.put("b", "2");
  const std::string d1 = live.checkpoint_delta(2, kNow);
  live.erase("a", kNow);
  const std::string d2 = live.checkpoint_delta(3, kNow);
  InMemoryStateBackend replica;
  CHECK(throws_corrupt([&] { replica.apply_delta(d1); }));  // fresh, not `base`
  replica.restore(base);
  CHECK(throws_corrupt([&] { replica.apply_delta(d2); }));  // d1 skipped
  CHECK(replica.apply_delta(d1) == 2);
  CHECK(throws_corrupt([&] { replica.apply_delta(d1); }));  // twice
  CHECK(replica.apply_delta(d2) == 3);
  CHECK(scan(replica, "") == scan(live, ""));
}

// Writers, readers and two capturing threads at once: every write lands in exactly one
// delta, and the captures form one chain (each names a distinct parent).
void test_concurrent_deltas() {
  InMemoryStateBackend live(small(8));
  const std::string base = live.checkpoint(0, kNow);
  constexpr int kWriters = 3;
  constexpr int kWrites = 4000;
  std::atomic<int> writers_left{kWriters};
  std::mutex captured_mutex;
  std::vector<std::string> deltas;
  std::vector<std::thread> threads;
  for (int t = 0; t < kWriters; ++t) {
    threads.emplace_back([&, t] {
      std::string prefix = numbered("w", t);
      prefix.push_back('/');
      for (int i = 0; i < kWrites; ++i) {
        live.put(numbered(prefix, i), std::to_string(i));
        if (i % 5 == 0) live.erase(numbered(prefix, i / 2), kNow);
      }
      writers_left.fetch_sub(1);
    });
  }
  for (int c = 0; c < 2; ++c) {
    threads.emplace_back([&, c] {
      while (writers_left.load() > 0) {
        std::string delta = live.checkpoint_delta(static_cast<std::uint64_t>(c), kNow);
        const std::lock_guard lock(captured_mutex);
        deltas.push_back(std::move(delta));
      }
    });
  }
  threads.emplace_back([&] {
    while (writers_left.load() > 0) (void)scan(live, "w1/");
  });
  for (auto& thread : threads) thread.join();
  deltas.push_back(live.checkpoint_delta(7, kNow));
  std::sort(deltas.begin(), deltas.end(), [](const std::string& a, const std::string& b) {
    return delta_sequence(a) < delta_sequence(b);
  });
  std::uint32_t parent = streamstate::record_identity(base);
  bool linked = true;
  for (const std::string& delta : deltas) {
    linked = linked && delta_parent(delta) == parent;
    parent = streamstate::record_identity(delta);
  }
  CHECK(linked);
  CHECK(replay(base, deltas, kNow) == live.checkpoint(1, kNow));
}

}  // namespace

int main() {
  test_put_get_delete();
  test_range_scan_sorted_and_bounded();
  test_checkpoint_restore_after_mutation();
  test_size_bytes_and_version();
  test_empty_round_trip_and_short_input();
  test_corrupt_restore_is_atomic();
  test_semantically_bad_snapshots();
  test_expiry();
  test_random_operations_against_model();
  test_bulk_load_then_point_and_ordered_reads();
  test_restore_in_place_never_writes_the_snapshot();
  test_concurrent_compare_and_set_increments();
  test_delta_chain_random();
  test_delta_refuses_a_wrong_base();
  test_concurrent_deltas();
  return check_summary("test_state_backend");
}
