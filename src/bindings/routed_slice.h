// One partition's rows of a routed batch as a Python object (RoutedSlice): what
// partition_batch(..., as_slices=True) returns per partition and
// PartitionAggregator.fold_slice() folds. It owns its keys, their table hashes and the
// value block, and nothing can change them after routing: the fold reuses the hashes
// without re-checking them, which is only safe because no caller can forge them.
#pragma once

#include "core/key_traits.h"
#include "core/partition_router.h"

#include <cstddef>
#include <variant>

namespace streamstate::bindings {

struct RoutedSlice {
  std::variant<RoutedRows<Int64Keys>, RoutedRows<BytesKeys>> rows;

  [[nodiscard]] bool is_bytes() const noexcept { return rows.index() == 1; }
  [[nodiscard]] std::size_t size() const noexcept {
    return std::visit([](const auto& r) { return r.size(); }, rows);
  }
  [[nodiscard]] std::size_t width() const noexcept {
    return std::visit([](const auto& r) { return r.width; }, rows);
  }
};

}  // namespace streamstate::bindings
