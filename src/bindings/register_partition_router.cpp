#include "bindings/arguments.h"
#include "bindings/arrays.h"
#include "bindings/buffers.h"
#include "bindings/key_columns.h"
#include "bindings/prelude.h"
#include "bindings/routed_slice.h"
#include "core/errors.h"
#include "core/key_traits.h"
#include "core/partition_router.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace streamstate::bindings {
namespace {

constexpr std::uint32_t kMaxPartitions = 65536;  // NumericAggregateStore's limit

// Whether `keys` are byte strings (else they are read as int64): numpy S/U, Arrow arrays
// of any non-integer format (ByteKeyColumn names the accepted ones), object arrays, and
// sequences whose first item is bytes or str.
bool holds_byte_keys(py::handle keys) {
  if (ByteKeyColumn::is_native(keys)) {
    if (!py::hasattr(keys, "__arrow_c_array__")) return true;
    const py::object pair = keys.attr("__arrow_c_array__")();
    if (!py::isinstance<py::tuple>(pair) || py::len(pair) != 2) return true;  // reader raises
    const py::object capsule = pair[py::int_(0)];
    const auto* schema = static_cast<const arrow_abi::ArrowSchema*>(
        PyCapsule_GetPointer(capsule.ptr(), "arrow_schema"));
    if (schema == nullptr) throw py::error_already_set();
    const std::string_view format = schema->format == nullptr ? "" : schema->format;
    const bool integer =
        format.size() == 1 && std::string_view("cCsSiIlL").find(format[0]) != std::string_view::npos;
    if (!integer) return true;
    // Arrow integer arrays route as int64 keys (read through numpy, where a null would
    // become a float NaN): refuse nulls here, by name.
    const py::object array_capsule = pair[py::int_(1)];
    const auto* array = static_cast<const arrow_abi::ArrowArray*>(
        PyCapsule_GetPointer(array_capsule.ptr(), "arrow_array"));
    if (array == nullptr) throw py::error_already_set();
    if (array->null_count != 0 && array->n_buffers > 0 && array->buffers[0] != nullptr) {
      throw py::value_error("keys hold nulls: keys cannot be null (drop or fill nulls first)");
    }
    return false;
  }
  if (py::isinstance<py::array>(keys)) {
    return py::reinterpret_borrow<py::array>(keys).dtype().kind() == 'O';
  }
  if (PyUnicode_Check(keys.ptr()) || PyBytes_Check(keys.ptr())) return true;  // reader refuses
  const Py_ssize_t size = PySequence_Check(keys.ptr()) != 0 ? PySequence_Size(keys.ptr()) : -1;
  if (size <= 0) {
    PyErr_Clear();
    return false;
  }
  const auto first = py::reinterpret_steal<py::object>(PySequence_GetItem(keys.ptr(), 0));
  if (!first) throw py::error_already_set();
  return PyBytes_Check(first.ptr()) || PyUnicode_Check(first.ptr()) || first.is_none();
}

// A value column: a one-dimensional array-like of fixed-size items, `n` long.
py::array column_arg(py::handle column, std::size_t index, std::size_t n) {
  auto array = py::array::ensure(column);
  const std::string name = "columns[" + std::to_string(index) + "]";
  if (!array) {
    PyErr_Clear();
    throw py::type_error(name + " must be a numpy array or array-like, not " + type_name(column));
  }
  if (array.dtype().kind() == 'O') {
    throw py::type_error(name + " must be a numeric (or fixed-width) array, not dtype object");
  }
  if (array.ndim() != 1) {
    throw InvalidArgument(name + " must be one-dimensional, got " + std::to_string(array.ndim()) +
                          " dimensions");
  }
  if (static_cast<std::size_t>(array.shape(0)) != n) {
    throw InvalidArgument(name + " has " + std::to_string(array.shape(0)) + " rows, keys have " +
                          std::to_string(n));
  }
  return array;
}

std::vector<py::ssize_t> shape_of(std::size_t rows) {
  return {static_cast<py::ssize_t>(rows)};
}

struct Gather {
  const char* source;
  py::ssize_t stride;
  std::size_t itemsize;
  std::vector<char*> out;  // one contiguous destination per partition
};

// Allocates partition p's copy of every column (GIL held) and records where to gather.
std::vector<Gather> allocate_columns(const std::vector<py::array>& columns,
                                     const PartitionPlan& plan, std::uint32_t partitions,
                                     std::vector<py::list>& rows_out) {
  std::vector<Gather> gathers;
  for (const py::array& column : columns) {
    Gather g{static_cast<const char*>(column.data()), column.strides(0),
             static_cast<std::size_t>(column.itemsize()), {}};
    for (std::uint32_t p = 0; p < partitions; ++p) {
      py::array part(column.dtype(), shape_of(plan.rows_of(p)));
      g.out.push_back(static_cast<char*>(part.mutable_data()));
      rows_out[p].append(std::move(part));
    }
    gathers.push_back(std::move(g));
  }
  return gathers;
}

void gather_columns(const std::vector<Gather>& gathers, const PartitionPlan& plan,
                    std::uint32_t partitions) noexcept {
  for (const Gather& g : gathers) {
    for (std::uint32_t p = 0; p < partitions; ++p) {
      gather_rows(plan, p, g.source, g.stride, g.itemsize, g.out[p]);
    }
  }
}

py::list as_tuples(std::vector<py::list>& parts) {
  py::list out;
  for (py::list& part : parts) out.append(py::tuple(part));
  return out;
}

py::list route_int64(py::handle keys, std::uint32_t partitions, std::uint32_t key_groups,
                     const std::vector<py::handle>& column_args) {
  const Int64Array ks = int_keys(keys);
  const auto n = static_cast<std::size_t>(ks.size());
  std::vector<py::array> columns;
  columns.push_back(ks);
  for (std::size_t c = 0; c < column_args.size(); ++c) {
    columns.push_back(column_arg(column_args[c], c, n));
  }
  const std::int64_t* k = ks.data();
  PartitionPlan plan;
  {
    const MaybeReleaseGil release(n * 8);  // reads the pinned array only
    plan = plan_partitions<Int64Keys>([k](std::size_t i) { return k[i]; }, n, partitions,
                                      key_groups);
  }
  std::vector<py::list> parts(partitions);
  const std::vector<Gather> gathers = allocate_columns(columns, plan, partitions, parts);
  {
    const MaybeReleaseGil release(n * 8 * columns.size());  // arrays this call owns or pins
    gather_columns(gathers, plan, partitions);
  }
  return as_tuples(parts);
}

// Keys come out as a fixed-width numpy 'S' array per partition (padding is not part of a
// key, so this is lossless) unless a key ends in a NUL byte or padding would more than
// quadruple the bytes, when they come out as a list of bytes.
py::list route_bytes(py::handle keys, std::uint32_t partitions, std::uint32_t key_groups,
                     const std::vector<py::handle>& column_args) {
  const ByteKeyColumn column(keys, "keys");
  const std::size_t n = column.size();
  std::vector<py::array> columns;
  for (std::size_t c = 0; c < column_args.size(); ++c) {
    columns.push_back(column_arg(column_args[c], c, n));
  }
  PartitionPlan plan;
  std::size_t width = 0;
  bool trailing_nul = false;
  {
    const MaybeReleaseGil release(n * 16 + column.total_bytes());  // `column` pins its buffers
    plan = plan_partitions<BytesKeys>([&column](std::size_t i) { return column.at(i); }, n,
                                      partitions, key_groups);
    for (std::size_t i = 0; i < n; ++i) {
      const std::string_view key = column.at(i);
      width = key.size() > width ? key.size() : width;
      trailing_nul = trailing_nul || (!key.empty() && key.back() == '\0');
    }
  }
  width = width == 0 ? 1 : width;
  const bool fixed_width = !trailing_nul && n * width <= 4 * column.total_bytes() + 16 * n;
  std::vector<py::list> parts(partitions);
  std::vector<char*> key_out(partitions, nullptr);
  for (std::uint32_t p = 0; p < partitions; ++p) {
    if (fixed_width) {
      py::array part(py::dtype("S" + std::to_string(width)), shape_of(plan.rows_of(p)));
      key_out[p] = static_cast<char*>(part.mutable_data());
      parts[p].append(std::move(part));
    } else {
      py::list part(static_cast<py::ssize_t>(plan.rows_of(p)));
      for (std::size_t j = 0; j < plan.rows_of(p); ++j) {
        const std::string_view key = column.at(plan.order[plan.bounds[p] + j]);
        PyObject* b = PyBytes_FromStringAndSize(key.data(), static_cast<Py_ssize_t>(key.size()));
        if (b == nullptr) throw py::error_already_set();
        PyList_SET_ITEM(part.ptr(), static_cast<Py_ssize_t>(j), b);
      }
      parts[p].append(std::move(part));
    }
  }
  const std::vector<Gather> gathers = allocate_columns(columns, plan, partitions, parts);
  {
    const MaybeReleaseGil release(n * (width + 8 * columns.size()));
    if (fixed_width) {
      for (std::uint32_t p = 0; p < partitions; ++p) {
        char* out = key_out[p];
        for (std::size_t j = 0; j < plan.rows_of(p); ++j, out += width) {
          const std::string_view key = column.at(plan.order[plan.bounds[p] + j]);
          std::memcpy(out, key.data(), key.size());
          std::memset(out + key.size(), 0, width - key.size());
        }
      }
    }
    gather_columns(gathers, plan, partitions);
  }
  return as_tuples(parts);
}

// The value columns of a routed slice: float64, one-dimensional, `n` long, at least one.
std::vector<Float64Array> slice_columns(const std::vector<py::handle>& column_args, std::size_t n) {
  if (column_args.empty()) {
    throw InvalidArgument("as_slices=True needs at least one value column to route");
  }
  std::vector<Float64Array> out;
  for (std::size_t c = 0; c < column_args.size(); ++c) {
    const py::array checked = column_arg(column_args[c], c, n);
    auto values = Float64Array::ensure(checked);
    if (!values) {
      PyErr_Clear();
      throw py::type_error("columns[" + std::to_string(c) +
                           "] must be numeric (cast to float64) for as_slices=True, got dtype " +
                           py::str(checked.dtype()).cast<std::string>());
    }
    out.push_back(std::move(values));
  }
  return out;
}

std::vector<const double*> column_pointers(const std::vector<Float64Array>& columns) {
  std::vector<const double*> out;
  for (const Float64Array& c : columns) out.push_back(c.data());
  return out;
}

template <class K>
py::list as_slices(std::vector<RoutedRows<K>>&& parts) {
  py::list out;
  for (RoutedRows<K>& part : parts) out.append(py::cast(RoutedSlice{std::move(part)}));
  return out;
}

py::list slices_int64(py::handle keys, std::uint32_t partitions, std::uint32_t key_groups,
                      const std::vector<py::handle>& column_args) {
  const Int64Array ks = int_keys(keys);
  const auto n = static_cast<std::size_t>(ks.size());
  const std::vector<Float64Array> columns = slice_columns(column_args, n);
  const std::vector<const double*> pointers = column_pointers(columns);
  const std::int64_t* k = ks.data();
  std::vector<RoutedRows<Int64Keys>> parts;
  {
    const MaybeReleaseGil release(n * 8 * (2 + columns.size()));  // pinned arrays only
    parts = route_rows<Int64Keys>([k](std::size_t i) { return k[i]; }, n, partitions, key_groups,
                                  pointers);
  }
  return as_slices(std::move(parts));
}

py::list slices_bytes(py::handle keys, std::uint32_t partitions, std::uint32_t key_groups,
                      const std::vector<py::handle>& column_args) {
  const ByteKeyColumn column(keys, "keys");
  const std::size_t n = column.size();
  const std::vector<Float64Array> columns = slice_columns(column_args, n);
  const std::vector<const double*> pointers = column_pointers(columns);
  std::vector<RoutedRows<BytesKeys>> parts;
  {
    // `column` pins its buffers; the arrays are pinned by this frame.
    const MaybeReleaseGil release(n * (24 + 8 * columns.size()) + column.total_bytes());
    parts = route_rows<BytesKeys>([&column](std::size_t i) { return column.at(i); }, n,
                                  partitions, key_groups, pointers);
  }
  return as_slices(std::move(parts));
}

py::array slice_keys(const RoutedSlice& slice) {
  if (const auto* r = std::get_if<RoutedRows<Int64Keys>>(&slice.rows)) {
    Int64Array out(static_cast<py::ssize_t>(r->size()));
    std::copy(r->keys.begin(), r->keys.end(), out.mutable_data());
    return out;
  }
  const auto& r = std::get<RoutedRows<BytesKeys>>(slice.rows);
  py::array out(py::dtype("O"), shape_of(r.size()));
  auto** items = static_cast<PyObject**>(out.mutable_data());
  for (std::size_t i = 0; i < r.size(); ++i) {
    PyObject* b = PyBytes_FromStringAndSize(r.keys[i].data(),
                                            static_cast<Py_ssize_t>(r.keys[i].size()));
    if (b == nullptr) throw py::error_already_set();
    Py_XDECREF(items[i]);  // numpy fills object arrays with None
    items[i] = b;
  }
  return out;
}

Float64Array slice_values(const RoutedSlice& slice) {
  return std::visit(
      [](const auto& r) {
        Float64Array out({static_cast<py::ssize_t>(r.size()), static_cast<py::ssize_t>(r.width)});
        std::copy(r.values.begin(), r.values.end(), out.mutable_data());
        return out;
      },
      slice.rows);
}

}  // namespace

void register_partition_router(py::module_& m) {
  py::class_<RoutedSlice>(m, "RoutedSlice", R"doc(
One partition's rows of a routed batch, from ``partition_batch(..., as_slices=True)``: its
keys, their table hashes (computed once, by routing) and its value columns as one (n, M)
float64 block, owned and read-only. ``PartitionAggregator.fold_slice(s)`` folds it reusing
the routing hashes, with no conversion of the keys or values. ``keys`` and ``values`` give
copies (int64 array or object array of bytes; an (n, M) float64 array).
)doc")
      .def("__len__", &RoutedSlice::size, "Rows in the slice.")
      .def_property_readonly("width", &RoutedSlice::width, "Value columns a row carries.")
      .def_property_readonly(
          "key_type", [](const RoutedSlice& s) { return s.is_bytes() ? "bytes" : "int64"; },
          "'int64' or 'bytes': the key type of the store that can fold the slice.")
      .def_property_readonly("keys", &slice_keys, "A copy of the keys, in batch order.")
      .def_property_readonly("values", &slice_values,
                             "A copy of the value block, (len, width) float64.")
      .def("__repr__", [](const RoutedSlice& s) {
        return "RoutedSlice(key_type='" + std::string(s.is_bytes() ? "bytes" : "int64") +
               "', rows=" + std::to_string(s.size()) + ", width=" + std::to_string(s.width()) +
               ")";
      });

  m.def(
      "key_group_range",
      [](const py::object& partition, const py::object& partitions, const py::object& key_groups) {
        const std::uint32_t p = int_arg<std::uint32_t>(partitions, "partitions", 1, kMaxPartitions);
        const auto g = int_arg<std::uint32_t>(key_groups, "key_groups", 1, kMaxKeyGroups);
        check_key_groups(p, g);
        const std::uint32_t pid = int_arg<std::uint32_t>(partition, "partition", 0, p - 1);
        const KeyGroupRange r = key_group_range(pid, p, g);
        return py::module_::import("builtins").attr("range")(r.first, r.end);
      },
      py::arg("partition"), py::arg("partitions"), py::arg("key_groups") = kDefaultKeyGroups,
      R"doc(
The key groups partition ``partition`` of ``partitions`` owns: ``range(ceil(p * G / P),
ceil((p + 1) * G / P))`` for G = ``key_groups`` (Flink's contiguous ranges: group g belongs
to partition ``g * P // G``). The ranges of all partitions cover ``range(key_groups)`` in
order. ValueError unless 1 <= partitions <= key_groups <= 65536 and 0 <= partition <
partitions.
)doc");

  m.def(
      "partition_batch",
      [](const py::object& keys, const py::object& partitions, const py::args& columns,
         const py::object& key_groups, const py::object& slices) {
        const std::uint32_t p = int_arg<std::uint32_t>(partitions, "partitions", 1, kMaxPartitions);
        const auto g = int_arg<std::uint32_t>(key_groups, "key_groups", 1, kMaxKeyGroups);
        check_key_groups(p, g);
        if (!PyBool_Check(slices.ptr())) {
          throw py::type_error("as_slices must be a bool, not " + type_name(slices));
        }
        std::vector<py::handle> column_args(columns.begin(), columns.end());
        const bool byte_keys = holds_byte_keys(keys);
        if (slices.ptr() == Py_True) {
          return byte_keys ? slices_bytes(keys, p, g, column_args)
                           : slices_int64(keys, p, g, column_args);
        }
        if (byte_keys) return route_bytes(keys, p, g, column_args);
        return route_int64(keys, p, g, column_args);
      },
      py::arg("keys"), py::arg("partitions"), py::kw_only(), py::arg("key_groups") = kDefaultKeyGroups,
      py::arg("as_slices") = false,
      R"doc(
Split a batch by partition in one pass: ``[(keys_p, *columns_p) for p in range(partitions)]``.

Each key goes to the owner of its key group: the group is picked by the key's stable hash
(the core's seedless hash, the one the aggregation tables use, re-mixed), one of
``key_groups`` (default 256, at least ``partitions``), and partition p owns the contiguous
groups ``key_group_range(p, partitions, key_groups)``. So a key lands in the same
partition in every process, run, version and machine, and whatever its representation (str, bytes, numpy 'U'/'S', Arrow
string/binary arrays: the partition of a str is that of its UTF-8 bytes; numpy padding NULs
are not part of a key). Integer keys (any signed dtype, unsigned up to 32 bits) come back
as int64 arrays; byte-string keys as a fixed-width numpy 'S' array per partition, or a
list of bytes when a key ends in a NUL byte (which 'S' cannot hold) or padding would cost
more than four times the key bytes. Each column (1-D, same length as ``keys``, any
non-object dtype) comes back as arrays of its own dtype, rows aligned with the keys, in
their original order within each partition (a counting sort). The GIL is released for the
hashing and the copies. A null key raises ValueError; keys of another type raise TypeError.

With ``as_slices=True`` it returns one :class:`RoutedSlice` per partition instead: the same
rows (same partition, same order), the columns cast to float64 and laid out as one (n, M)
block, and every key's hash kept, so ``PartitionAggregator.fold_slice`` folds the slice
without hashing or converting anything again (at least one column is needed).
)doc");
}

}  // namespace streamstate::bindings
