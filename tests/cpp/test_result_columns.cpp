// C++ unit tests for the result columns (result_columns.h): byte-string keys gathered from
// drained parts into Arrow's offsets + data layout, and the offset width chosen by size.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <string_view>
#include <vector>

#include "core/result_columns.h"
#include "core/stats.h"

#include "check.h"

namespace {

using streamstate::ArrowBinaryColumn;
using streamstate::ArrowOffsets;
using streamstate::GroupColumns;
using streamstate::Moments;
using streamstate::test::check_summary;

template <class Offset>
std::vector<std::string> keys_of(ArrowBinaryColumn& column) {
  const auto* offsets = reinterpret_cast<const Offset*>(column.offsets.buffer().data());
  std::vector<std::string> out;
  for (std::size_t i = 0; i < column.offsets.keys(); ++i) {
    const auto begin = static_cast<std::size_t>(offsets[i]);
    const auto end = static_cast<std::size_t>(offsets[i + 1]);
    out.emplace_back(column.data.data() + begin, end - begin);
  }
  return out;
}

void test_keys_of_every_part_in_order() {
  // Enough keys to fill several 64 KiB chunks per part, empty keys included, over parts of
  // which one is empty.
  std::vector<GroupColumns> parts(3);
  std::vector<std::string> expected;
  Moments m;
  m.add(1.0);
  for (std::size_t part : {0U, 2U}) {
    for (std::size_t i = 0; i < 40'000; ++i) {
      std::string key = std::to_string(part) + ":" + std::string(i % 7, 'x') + std::to_string(i);
      if (i % 1000 == 0) key.clear();
      parts[part].emit(key, m);
      expected.push_back(key);
    }
  }
  std::size_t total = 0;
  for (const std::string& k : expected) total += k.size();
  ArrowBinaryColumn column = streamstate::take_arrow_keys(parts);
  CHECK(!column.offsets.large());
  CHECK(column.offsets.keys() == expected.size());
  CHECK(column.data_bytes == total);
  CHECK(keys_of<std::int32_t>(column) == expected);
  for (const GroupColumns& p : parts) CHECK(p.bytes_keys.size() == 0 && p.bytes_keys.total_bytes() == 0);
}

void test_no_keys() {
  std::vector<GroupColumns> parts(2);
  ArrowBinaryColumn column = streamstate::take_arrow_keys(parts);
  CHECK(column.offsets.keys() == 0 && column.data_bytes == 0);
  // One offset, 0, even for no keys (Arrow needs n + 1).
  CHECK(reinterpret_cast<const std::int32_t*>(column.offsets.buffer().data())[0] == 0);
}

void test_offset_width() {
  const auto int32_max = static_cast<std::size_t>(std::numeric_limits<std::int32_t>::max());
  CHECK(!ArrowOffsets(3, int32_max).large());
  ArrowOffsets large(2, int32_max + 1);
  CHECK(large.large());
  large.set(1, int32_max + 1);
  large.set(2, std::size_t{5} << 32);
  const auto* values = reinterpret_cast<const std::int64_t*>(large.buffer().data());
  CHECK(values[0] == 0);
  CHECK(values[1] == static_cast<std::int64_t>(int32_max) + 1);
  CHECK(values[2] == std::int64_t{5} << 32);
}

void test_offsets_from_ends() {
  const std::vector<std::size_t> ends{3, 3, 10};
  ArrowOffsets offsets = streamstate::arrow_offsets(ends);
  const auto* values = reinterpret_cast<const std::int32_t*>(offsets.buffer().data());
  CHECK(offsets.keys() == 3);
  CHECK(values[0] == 0 && values[1] == 3 && values[2] == 3 && values[3] == 10);
  CHECK(streamstate::arrow_offsets({}).keys() == 0);
}

}  // namespace

int main() {
  test_keys_of_every_part_in_order();
  test_no_keys();
  test_offset_width();
  test_offsets_from_ends();
  return check_summary("test_result_columns");
}
