// C++ unit tests for the partition router (partition_router.h): pinned partitions (the
// same values tests/test_partition_router.py pins through Python), and the counting sort.
#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "core/key_traits.h"
#include "core/partition_router.h"

#include "check.h"

namespace {

using streamstate::BytesKeys;
using streamstate::Int64Keys;
using streamstate::partition_of;

void test_known_answers() {
  // With as many key groups as partitions a key's partition is its group: what routing
  // gave before key groups existed, so the answers pinned then still hold.
  const std::vector<std::string_view> keys = {"", "a", "JFK-LAX", "EWR-ORD",
                                              "a somewhat longer key of 33 bytes"};
  const std::vector<std::uint32_t> expected_bytes = {59, 594, 39, 181, 943};
  const std::vector<std::uint32_t> groups_bytes = {15, 152, 10, 46, 241};
  const std::vector<std::uint32_t> thirds_bytes = {0, 1, 0, 0, 2};
  for (std::size_t i = 0; i < keys.size(); ++i) {
    CHECK(partition_of<BytesKeys>(keys[i], 1000, 1000) == expected_bytes[i]);
    CHECK(streamstate::key_group_of<BytesKeys>(keys[i], 256) == groups_bytes[i]);
    CHECK(partition_of<BytesKeys>(keys[i], 3) == thirds_bytes[i]);
  }
  const std::vector<std::int64_t> ints = {0, 1, 2, -1, std::int64_t{1} << 62};
  const std::vector<std::uint32_t> expected_ints = {485, 162, 702, 926, 260};
  const std::vector<std::uint32_t> groups_ints = {124, 41, 179, 237, 66};
  const std::vector<std::uint32_t> thirds_ints = {1, 0, 2, 2, 0};
  for (std::size_t i = 0; i < ints.size(); ++i) {
    CHECK(partition_of<Int64Keys>(ints[i], 1000, 1000) == expected_ints[i]);
    CHECK(streamstate::key_group_of<Int64Keys>(ints[i], 256) == groups_ints[i]);
    CHECK(partition_of<Int64Keys>(ints[i], 3) == thirds_ints[i]);
  }
}

// Partition p owns exactly the groups g with floor(g * P / G) == p, contiguous and in
// order; and when P divides G a key's owner is floor(fresh * P / 2^64), the partition of
// routing before key groups (which the 1000-partition answers above pin).
void test_key_group_ranges() {
  for (const std::uint32_t groups : {1U, 7U, 16U, 256U, 1000U}) {
    for (std::uint32_t parts = 1; parts <= groups && parts <= 40; ++parts) {
      std::uint32_t next = 0;
      for (std::uint32_t p = 0; p < parts; ++p) {
        const streamstate::KeyGroupRange r = streamstate::key_group_range(p, parts, groups);
        CHECK(r.first == next);
        CHECK(r.end > r.first);  // every partition owns a group
        for (std::uint32_t g = r.first; g < r.end; ++g) {
          CHECK(streamstate::owner_of_group(g, parts, groups) == p);
        }
        next = r.end;
      }
      CHECK(next == groups);
    }
  }
  for (std::int64_t k = 0; k < 5000; ++k) {
    for (const std::uint32_t parts : {1U, 2U, 4U, 8U, 64U, 256U}) {
      CHECK(partition_of<Int64Keys>(k, parts) == partition_of<Int64Keys>(k, parts, parts));
    }
  }
  bool refused = false;
  try {
    streamstate::check_key_groups(257, 256);
  } catch (const std::invalid_argument&) {
    refused = true;
  }
  CHECK(refused);
}

void test_plan_is_a_stable_counting_sort() {
  constexpr std::size_t kRows = 10000;
  constexpr std::uint32_t kParts = 7;
  const auto key_at = [](std::size_t i) { return static_cast<std::int64_t>(i % 1234); };
  const streamstate::PartitionPlan plan =
      streamstate::plan_partitions<Int64Keys>(key_at, kRows, kParts);
  CHECK(plan.bounds.size() == kParts + 1);
  CHECK(plan.bounds.front() == 0 && plan.bounds.back() == kRows);
  std::vector<int> seen(kRows, 0);
  for (std::uint32_t p = 0; p < kParts; ++p) {
    CHECK(plan.rows_of(p) > kRows / kParts / 2);  // fair
    for (std::size_t j = plan.bounds[p]; j < plan.bounds[p + 1]; ++j) {
      const std::size_t row = plan.order[j];
      ++seen[row];
      CHECK(partition_of<Int64Keys>(key_at(row), kParts) == p);
      if (j > plan.bounds[p]) CHECK(plan.order[j - 1] < row);  // ascending within p
    }
  }
  for (const int s : seen) CHECK(s == 1);
  // gather_rows copies partition p's rows contiguously, for any item size.
  std::vector<std::int64_t> column(kRows);
  for (std::size_t i = 0; i < kRows; ++i) column[i] = static_cast<std::int64_t>(i) * 3;
  std::vector<std::int64_t> out(plan.rows_of(2));
  streamstate::gather_rows(plan, 2, reinterpret_cast<const char*>(column.data()),
                           sizeof(std::int64_t), sizeof(std::int64_t),
                           reinterpret_cast<char*>(out.data()));
  for (std::size_t j = 0; j < out.size(); ++j) {
    CHECK(out[j] == column[plan.order[plan.bounds[2] + j]]);
  }
}

// route_rows gives each partition its rows in batch order, with the table hash of every
// key and the row's values side by side; moving the result keeps byte keys' views valid.
void test_route_rows_keeps_hashes_and_rows() {
  constexpr std::size_t kRows = 3000;
  constexpr std::uint32_t kParts = 3;
  std::vector<std::string> owned;
  for (std::size_t i = 0; i < kRows; ++i) owned.push_back("key-" + std::to_string(i % 777));
  std::vector<double> a(kRows);
  std::vector<double> b(kRows);
  for (std::size_t i = 0; i < kRows; ++i) {
    a[i] = static_cast<double>(i);
    b[i] = -static_cast<double>(i);
  }
  const auto key_at = [&owned](std::size_t i) { return std::string_view(owned[i]); };
  std::vector<streamstate::RoutedRows<BytesKeys>> parts = streamstate::route_rows<BytesKeys>(
      key_at, kRows, kParts, 256, {a.data(), b.data()});
  const std::vector<streamstate::RoutedRows<BytesKeys>> moved = std::move(parts);
  CHECK(moved.size() == kParts);
  std::size_t total = 0;
  for (std::uint32_t p = 0; p < kParts; ++p) {
    const streamstate::RoutedRows<BytesKeys>& r = moved[p];
    CHECK(r.width == 2 && r.values.size() == 2 * r.size() && r.hashes.size() == r.size());
    double last = -1;
    for (std::size_t j = 0; j < r.size(); ++j) {
      const double row = r.values[2 * j];
      CHECK(row > last);  // batch order kept
      last = row;
      const auto i = static_cast<std::size_t>(row);
      CHECK(r.keys[j] == owned[i]);
      CHECK(r.hashes[j] == BytesKeys::hash(owned[i]));
      CHECK(r.values[2 * j + 1] == b[i]);
      CHECK(partition_of<BytesKeys>(r.keys[j], kParts) == p);
    }
    total += r.size();
  }
  CHECK(total == kRows);
}

}  // namespace

int main() {
  test_known_answers();
  test_key_group_ranges();
  test_plan_is_a_stable_counting_sort();
  test_route_rows_keeps_hashes_and_rows();
  return streamstate::test::check_summary("test_partition_router");
}
