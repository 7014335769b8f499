// Spill file format and spilling aggregator: round trips, damage detection, memory bound.
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <limits>
#include <map>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "core/errors.h"
#include "core/spill_file.h"
#include "core/spilling_aggregator.h"
#include "core/stats.h"

#include "check.h"

using namespace streamstate;
using streamstate::test::check_summary;

namespace {

std::uint64_t bits(double v) {
  std::uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

bool same(const Moments& a, const Moments& b) {
  return a.count == b.count && bits(a.sum) == bits(b.sum) && bits(a.min) == bits(b.min) &&
         bits(a.max) == bits(b.max) && bits(a.shift) == bits(b.shift) &&
         bits(a.dsum) == bits(b.dsum) && bits(a.dsq) == bits(b.dsq);
}

Moments of(std::initializer_list<double> values) {
  Moments m;
  for (double v : values) m.add(v);
  return m;
}

std::string make_dir() {
  char tmpl[] = "/tmp/streamstate-spill-cpptest-XXXXXX";
  const char* d = ::mkdtemp(tmpl);
  if (d == nullptr) {
    std::perror("mkdtemp");
    std::exit(2);
  }
  return d;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

void write_file(const std::string& path, const std::string& data) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(data.data(), static_cast<std::streamsize>(data.size()));
}

const std::vector<Moments> kSamples = {
    of({1.5}),
    of({-0.0}),
    of({std::numeric_limits<double>::quiet_NaN()}),
    of({std::numeric_limits<double>::infinity()}),
    of({1.0, 2.0, 4.0}),
    of({1e9, 1e9 + 1, std::numeric_limits<double>::quiet_NaN()}),
    of({-3.25, 8.0}),
};

// Writes the samples as two runs of int64 keys; returns the bytes written.
std::uint64_t write_int_file(const std::string& path, std::string& buffer) {
  std::uint64_t written = 0;
  for (int run = 0; run < 2; ++run) {
    SpillRunWriter w(path, SpillKeyType::kInt64, buffer, 64, written);
    for (std::size_t i = 0; i < kSamples.size(); ++i) {
      w.add(static_cast<std::int64_t>(i) * (run == 0 ? 1 : -1) - run * (1LL << 62), kSamples[i]);
    }
    written += w.finish();
  }
  return written;
}

std::size_t read_all(const std::string& path, SpillKeyType type, std::uint64_t size) {
  std::string buffer;
  SpillFileReader r(path, type, buffer, size);
  std::size_t n = 0;
  Moments m;
  if (type == SpillKeyType::kInt64) {
    std::int64_t k = 0;
    while (r.next(k, m)) ++n;
  } else {
    std::string_view k;
    while (r.next(k, m)) ++n;
  }
  return n;
}

void test_singleton_detection() {
  CHECK(spill_is_singleton(of({1.5})));
  CHECK(spill_is_singleton(of({-0.0})));
  CHECK(spill_is_singleton(of({std::numeric_limits<double>::quiet_NaN()})));
  CHECK(!spill_is_singleton(of({1.0, 2.0})));
  Moments merged;
  merged.merge(of({7.0}));
  CHECK(spill_is_singleton(merged));
  Moments odd = of({2.0});
  odd.sum = 3.0;  // not what add() produces: must be stored in full
  CHECK(!spill_is_singleton(odd));
}

void test_int_round_trip(const std::string& dir) {
  const std::string path = dir + "/ints.spill";
  std::string buffer;
  const std::uint64_t size = write_int_file(path, buffer);
  struct stat st {};
  CHECK(::stat(path.c_str(), &st) == 0 && static_cast<std::uint64_t>(st.st_size) == size);
  std::string rbuf;
  SpillFileReader r(path, SpillKeyType::kInt64, rbuf, size);
  std::int64_t key = 0;
  Moments m;
  for (int run = 0; run < 2; ++run) {
    for (std::size_t i = 0; i < kSamples.size(); ++i) {
      CHECK(r.next(key, m));
      CHECK(key == static_cast<std::int64_t>(i) * (run == 0 ? 1 : -1) - run * (1LL << 62));
      CHECK(same(m, kSamples[i]));
    }
  }
  CHECK(!r.next(key, m));
  ::unlink(path.c_str());
}

void test_bytes_round_trip(const std::string& dir) {
  const std::string path = dir + "/bytes.spill";
  const std::vector<std::string> keys = {"", "a", std::string(1, '\0'), std::string(5000, 'x'),
                                         "\xff\xfe"};
  std::string buffer;
  std::uint64_t size = 0;
  {
    SpillRunWriter w(path, SpillKeyType::kBytes, buffer, 32, 0);
    for (std::size_t i = 0; i < keys.size(); ++i) w.add(std::string_view(keys[i]), kSamples[i]);
    size = w.finish();
  }
  std::string rbuf;
  SpillFileReader r(path, SpillKeyType::kBytes, rbuf, size);
  std::string_view key;
  Moments m;
  for (std::size_t i = 0; i < keys.size(); ++i) {
    CHECK(r.next(key, m));
    CHECK(key == keys[i]);
    CHECK(same(m, kSamples[i]));
  }
  CHECK(!r.next(key, m));
  // The key type is part of the header.
  bool refused = false;
  try {
    (void)read_all(path, SpillKeyType::kInt64, size);
  } catch (const CorruptDataError&) {
    refused = true;
  }
  CHECK(refused);
  ::unlink(path.c_str());
}

// Every single-bit flip anywhere in the file, and every truncation, is reported as
// CorruptDataError naming the file; none yields records silently.
void test_damage_is_always_detected(const std::string& dir) {
  const std::string path = dir + "/damage.spill";
  std::string buffer;
  const std::uint64_t size = write_int_file(path, buffer);
  const std::string good = read_file(path);
  CHECK(read_all(path, SpillKeyType::kInt64, size) == 2 * kSamples.size());
  std::size_t detected = 0;
  std::size_t named = 0;
  for (std::size_t i = 0; i < good.size(); ++i) {
    for (int bit = 0; bit < 8; bit += 3) {
      std::string bad = good;
      bad[i] = static_cast<char>(bad[i] ^ (1 << bit));
      write_file(path, bad);
      try {
        (void)read_all(path, SpillKeyType::kInt64, size);
      } catch (const CorruptDataError& e) {
        ++detected;
        if (std::string(e.what()).find(path) != std::string::npos) ++named;
      }
    }
  }
  CHECK(detected == good.size() * 3);
  CHECK(named == detected);
  std::size_t truncations = 0;
  for (std::size_t len = 0; len < good.size(); ++len) {
    write_file(path, good.substr(0, len));
    try {
      (void)read_all(path, SpillKeyType::kInt64, size);
    } catch (const CorruptDataError&) {
      ++truncations;
    }
  }
  CHECK(truncations == good.size());
  ::unlink(path.c_str());
}

void test_io_errors_name_the_path(const std::string& dir) {
  const std::string path = dir + "/missing/sub.spill";
  std::string buffer;
  bool thrown = false;
  try {
    SpillRunWriter w(path, SpillKeyType::kInt64, buffer, 64, 0);
  } catch (const SpillIoError& e) {
    thrown = e.path() == path && e.error_number() == ENOENT &&
             std::string(e.what()).find(path) != std::string::npos;
  }
  CHECK(thrown);
  thrown = false;
  try {
    (void)read_all(path, SpillKeyType::kInt64, 0);
  } catch (const SpillIoError& e) {
    thrown = e.path() == path && e.error_number() == ENOENT;
  }
  CHECK(thrown);
}

struct Expected {
  std::uint64_t count = 0;
  double sum = 0, min = INFINITY, max = -INFINITY;
};

template <class Agg, class Key>
bool matches(std::vector<GroupColumns>& parts, const std::map<Key, Expected>& want) {
  std::size_t total = 0;
  bool ok = true;
  for (GroupColumns& p : parts) {
    total += p.size();
    std::vector<Key> keys;
    if constexpr (std::is_same_v<Key, std::int64_t>) {
      keys.assign(p.int_keys.data(), p.int_keys.data() + p.int_keys.size());
    } else {
      p.bytes_keys.for_each([&](std::string_view k) { keys.emplace_back(k); });
    }
    for (std::size_t i = 0; i < keys.size(); ++i) {
      const auto it = want.find(keys[i]);
      if (it == want.end()) return false;
      const Expected& e = it->second;
      ok = ok && p.count.data()[i] == e.count && p.sum.data()[i] == e.sum &&
           p.min.data()[i] == e.min && p.max.data()[i] == e.max;
    }
  }
  return ok && total == want.size();
}

void test_int_aggregator(const std::string& dir) {
  for (const std::size_t limit : {std::size_t{64} << 10, std::size_t{256} << 10, std::size_t{0}}) {
    SpillingAggregatorOptions o;
    o.mem_limit_bytes = limit;
    o.spill_dir = dir;
    o.threads = 2;
    Int64SpillingAggregator agg(o);
    std::mt19937_64 rng(42);
    std::map<std::int64_t, Expected> want;
    std::vector<std::int64_t> keys(50'000);
    std::vector<double> values(keys.size());
    for (int batch = 0; batch < 4; ++batch) {
      for (std::size_t i = 0; i < keys.size(); ++i) {
        keys[i] = static_cast<std::int64_t>(rng() % 60'000) * 1'000'003;
        values[i] = static_cast<double>(rng() % 201) - 100.0;
        Expected& e = want[keys[i]];
        ++e.count;
        e.sum += values[i];
        e.min = std::min(e.min, values[i]);
        e.max = std::max(e.max, values[i]);
      }
      agg.accumulate_batch(keys.data(), values.data(), keys.size());
      if (limit != 0) CHECK(agg.diagnostics().memory_bytes <= limit);
    }
    agg.accumulate(-5, 1.0);
    want[-5] = Expected{1, 1.0, 1.0, 1.0};
    auto parts = agg.drain();
    CHECK((matches<Int64SpillingAggregator, std::int64_t>(parts, want)));
    const SpillDiagnostics d = agg.diagnostics();
    if (limit != 0) {
      CHECK(d.peak_memory_bytes <= limit);
      CHECK(d.spill_count > 0);
      CHECK(d.spill_depth >= (limit == (64 << 10) ? 3u : 1u));  // 64 KiB: repartitioned twice
    } else {
      CHECK(d.spill_count == 0);
    }
    CHECK(d.spill_files == 0);
    CHECK(agg.closed());
  }
}

void test_bytes_aggregator(const std::string& dir) {
  SpillingAggregatorOptions o;
  o.mem_limit_bytes = 64 << 10;
  o.spill_dir = dir;
  BytesSpillingAggregator agg(o);
  std::mt19937_64 rng(7);
  std::vector<std::string> storage;
  std::map<std::string, Expected> want;
  for (int i = 0; i < 40'000; ++i) {
    storage.push_back("key-" + std::to_string(rng() % 9'000) + std::string(rng() % 30, 'z'));
  }
  std::vector<std::string_view> keys(storage.begin(), storage.end());
  std::vector<double> values(keys.size());
  for (std::size_t i = 0; i < keys.size(); ++i) {
    values[i] = static_cast<double>(i % 17);
    Expected& e = want[storage[i]];
    ++e.count;
    e.sum += values[i];
    e.min = std::min(e.min, values[i]);
    e.max = std::max(e.max, values[i]);
  }
  agg.accumulate_batch(keys.data(), values.data(), keys.size());
  auto parts = agg.drain();
  CHECK((matches<BytesSpillingAggregator, std::string>(parts, want)));
  CHECK(agg.diagnostics().peak_memory_bytes <= o.mem_limit_bytes);
  CHECK(agg.diagnostics().spill_count > 0);
}

void test_rejects_tiny_limits(const std::string& dir) {
  SpillingAggregatorOptions o;
  o.mem_limit_bytes = kMinSpillMemLimit - 1;
  o.spill_dir = dir;
  bool thrown = false;
  try {
    Int64SpillingAggregator agg(o);
  } catch (const InvalidArgument&) {
    thrown = true;
  }
  CHECK(thrown);
}

void test_growable_buffer() {
  ResultColumn<std::uint64_t> a;
  ResultColumn<std::uint64_t> b;
  for (std::uint64_t i = 0; i < 100'000; ++i) (i % 3 == 0 ? b : a).push_back(i);
  const std::size_t na = a.size();
  a.append(b);
  CHECK(a.size() == 100'000 && b.size() == 0);
  bool ok = true;
  std::size_t j = 0;
  for (std::uint64_t i = 0; i < 100'000; ++i) {
    if (i % 3 != 0) ok = ok && a.data()[j++] == i;
  }
  for (std::uint64_t i = 0; i < 100'000; i += 3) ok = ok && a.data()[j++] == i;
  CHECK(ok && j == 100'000 && na < 100'000);
}

}  // namespace

// Spill files are opened without following symlinks, created exclusively, and appended to
// only while they are the file earlier runs left.
void test_planted_files_are_refused(const std::string& dir) {
  const std::string victim = dir + "/victim";
  const std::string path = dir + "/planted.spill";
  { std::ofstream(victim) << "victim's data"; }
  CHECK(::symlink(victim.c_str(), path.c_str()) == 0);
  std::string buffer;
  const auto error_of = [&](std::uint64_t existing) {
    try {
      SpillRunWriter w(path, SpillKeyType::kInt64, buffer, 64, existing);
      w.add(std::int64_t{1}, kSamples[0]);
      (void)w.finish();
    } catch (const SpillIoError& e) {
      return e.error_number();
    }
    return 0;
  };
  CHECK(error_of(0) == EEXIST);   // a new file: the name must be free
  CHECK(error_of(12) == ELOOP);   // a later run: never through a symlink
  int read_error = 0;
  try {
    (void)read_all(path, SpillKeyType::kInt64, 13);
  } catch (const SpillIoError& e) {
    read_error = e.error_number();
  }
  CHECK(read_error == ELOOP);
  std::ifstream in(victim);
  const std::string contents((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  CHECK(contents == "victim's data");
  ::unlink(path.c_str());
  // A regular file of the wrong length is not appended to, nor cut back.
  { std::ofstream(path) << "planted"; }
  bool corrupt = false;
  try {
    SpillRunWriter w(path, SpillKeyType::kInt64, buffer, 64, 100);
  } catch (const CorruptDataError&) {
    corrupt = true;
  }
  CHECK(corrupt);
  struct stat st {};
  CHECK(::stat(path.c_str(), &st) == 0 && st.st_size == 7);
  ::unlink(path.c_str());
  ::unlink(victim.c_str());
}

int main() {
  const std::string dir = make_dir();
  test_singleton_detection();
  test_int_round_trip(dir);
  test_bytes_round_trip(dir);
  test_damage_is_always_detected(dir);
  test_io_errors_name_the_path(dir);
  test_planted_files_are_refused(dir);
  test_int_aggregator(dir);
  test_bytes_aggregator(dir);
  test_rejects_tiny_limits(dir);
  test_growable_buffer();
  const bool empty = ::rmdir(dir.c_str()) == 0;  // fails if any spill file was left behind
  CHECK(empty);
  return check_summary("test_spilling_aggregator");
}
