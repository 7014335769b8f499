// C++ unit tests for the partition router (partition_router.h): pinned partitions (the
// same values tests/test_partition_router.py pins through Python), and the counting sort.
#include <cstddef>
#include <cstdint>
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
  const std::vector<std::string_view> keys = {"", "a", "JFK-LAX", "EWR-ORD",
                                              "a somewhat longer key of 33 bytes"};
  const std::vector<std::uint32_t> expected_bytes = {59, 594, 39, 181, 943};
  for (std::size_t i = 0; i < keys.size(); ++i) {
    CHECK(partition_of<BytesKeys>(keys[i], 1000) == expected_bytes[i]);
  }
  const std::vector<std::int64_t> ints = {0, 1, 2, -1, std::int64_t{1} << 62};
  const std::vector<std::uint32_t> expected_ints = {485, 162, 702, 926, 260};
  for (std::size_t i = 0; i < ints.size(); ++i) {
    CHECK(partition_of<Int64Keys>(ints[i], 1000) == expected_ints[i]);
  }
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

}  // namespace

int main() {
  test_known_answers();
  test_plan_is_a_stable_counting_sort();
  return streamstate::test::check_summary("test_partition_router");
}
