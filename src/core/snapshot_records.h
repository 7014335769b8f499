// Naming the records a store's snapshot is made of, shared by every store's codec: a record
// that belongs to one partition is named by a prefix, then the partition id as u32 (then,
// for some records, more bytes such as a window's start).
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "core/byte_io.h"
#include "core/errors.h"

namespace streamstate {

// The name of `prefix`'s record for partition `pid`.
[[nodiscard]] inline std::string partition_record_name(std::string_view prefix,
                                                       std::uint32_t pid) {
  std::string name(prefix);
  put_u32(name, pid);
  return name;
}

// The partition of a record named prefix + u32 (+ `suffix` more bytes, returned in `rest`),
// or nullopt for a record of another name. A partition >= `num_partitions` is corrupt data:
// CorruptDataError, its message led by `codec` (which snapshot format found it).
[[nodiscard]] inline std::optional<std::uint32_t> partition_of_record(
    std::string_view name, std::string_view prefix, std::uint32_t num_partitions,
    std::string_view codec, std::size_t suffix = 0, std::string_view* rest = nullptr) {
  if (name.size() != prefix.size() + 4 + suffix || name.substr(0, prefix.size()) != prefix) {
    return std::nullopt;
  }
  const std::uint32_t pid = load_u32(name.data() + prefix.size());
  if (pid >= num_partitions) {
    throw CorruptDataError(std::string(codec) + ": partition id " + std::to_string(pid) +
                           " >= num_partitions " + std::to_string(num_partitions));
  }
  if (rest != nullptr) *rest = name.substr(prefix.size() + 4);
  return pid;
}

// "one unnamed value column" or "value columns ['a', 'b']", for errors that compare what a
// snapshot was written with against the store reading it.
[[nodiscard]] inline std::string describe_value_columns(const std::vector<std::string>& columns) {
  if (columns.empty()) return "one unnamed value column";
  std::string out = "value columns [";
  for (std::size_t c = 0; c < columns.size(); ++c) {
    if (c > 0) out += ", ";
    out += "'" + columns[c] + "'";
  }
  return out + "]";
}

}  // namespace streamstate
