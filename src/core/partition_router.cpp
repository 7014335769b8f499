#include "core/partition_router.h"

#include <cstring>
#include <string>

#include "core/errors.h"

namespace streamstate {
namespace {

template <class T>
void gather_typed(const std::size_t* rows, std::size_t n, const char* column,
                  std::ptrdiff_t stride, char* out) noexcept {
  for (std::size_t j = 0; j < n; ++j) {
    T item;
    std::memcpy(&item, column + static_cast<std::ptrdiff_t>(rows[j]) * stride, sizeof item);
    std::memcpy(out + j * sizeof item, &item, sizeof item);
  }
}

}  // namespace

void check_key_groups(std::uint32_t partitions, std::uint32_t key_groups) {
  if (key_groups == 0 || key_groups > kMaxKeyGroups) {
    throw InvalidArgument("key_groups must be between 1 and " + std::to_string(kMaxKeyGroups) +
                          ", got " + std::to_string(key_groups));
  }
  if (partitions == 0 || partitions > key_groups) {
    throw InvalidArgument("partitions must be between 1 and key_groups (" +
                          std::to_string(key_groups) + "): each partition owns at least one "
                          "key group, got " + std::to_string(partitions) +
                          " partitions (pass a larger key_groups)");
  }
}

void gather_rows(const PartitionPlan& plan, std::uint32_t p, const char* column,
                 std::ptrdiff_t stride, std::size_t itemsize, char* out) noexcept {
  const std::size_t* rows = plan.order.data() + plan.bounds[p];
  const std::size_t n = plan.rows_of(p);
  // Fixed sizes compile to single loads and stores; anything else copies item by item.
  switch (itemsize) {
    case 1:
      return gather_typed<std::uint8_t>(rows, n, column, stride, out);
    case 2:
      return gather_typed<std::uint16_t>(rows, n, column, stride, out);
    case 4:
      return gather_typed<std::uint32_t>(rows, n, column, stride, out);
    case 8:
      return gather_typed<std::uint64_t>(rows, n, column, stride, out);
    default:
      for (std::size_t j = 0; j < n; ++j) {
        std::memcpy(out + j * itemsize, column + static_cast<std::ptrdiff_t>(rows[j]) * stride,
                    itemsize);
      }
  }
}

}  // namespace streamstate
