#include "bindings/arguments.h"
#include "bindings/arrays.h"
#include "bindings/buffers.h"
#include "bindings/key_columns.h"
#include "bindings/key_dispatch.h"
#include "bindings/prelude.h"
#include "bindings/result_arrays.h"
#include "bindings/value_block.h"
#include "core/errors.h"
#include "core/stats.h"
#include "core/window_store.h"

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace streamstate::bindings {
namespace {

using Int64Store = WindowedAggregateStore<Int64Keys>;
using BytesStore = WindowedAggregateStore<BytesKeys>;
using WindowStoreHandle = KeyDispatch<Int64Store, BytesStore>;

constexpr std::uint32_t kMaxPartitions = 65536;

struct WindowPartitionHandle {
  std::shared_ptr<WindowStoreHandle> store;
  std::uint32_t partition_id;
};

WindowKind kind_arg(py::handle value) {
  const std::string_view name = choice_arg(value, "kind", {"tumbling", "hopping", "session"});
  if (name == "hopping") return WindowKind::kHopping;
  if (name == "session") return WindowKind::kSession;
  return WindowKind::kTumbling;
}

// Event times: a 1-D integer array of epoch milliseconds (int64, or narrower), or numpy
// datetime64[ms]. Floats are refused rather than truncated.
Int64Array times_arg(py::handle times) {
  auto array = py::array::ensure(times);
  if (!array || PyUnicode_Check(times.ptr()) || PyBytes_Check(times.ptr())) {
    PyErr_Clear();
    throw py::type_error("times must be an int64 array of epoch milliseconds, not " +
                         type_name(times));
  }
  if (array.ndim() != 1) {
    throw InvalidArgument("times must be one-dimensional, got " + std::to_string(array.ndim()) +
                          " dimensions");
  }
  const py::dtype dtype = array.dtype();
  const char kind = dtype.kind();
  if (kind == 'M') {
    if (py::str(dtype).cast<std::string>() != "datetime64[ms]") {
      throw py::type_error("times of dtype " + py::str(dtype).cast<std::string>() +
                           ": convert datetimes to datetime64[ms] (or int64 epoch milliseconds)");
    }
    array = array.attr("view")("int64").cast<py::array>();
  } else if (!(kind == 'i' || (kind == 'u' && dtype.itemsize() <= 4)) && array.size() > 0) {
    throw py::type_error("times must be an int64 array of epoch milliseconds, got dtype " +
                         py::str(dtype).cast<std::string>());
  }
  auto out = Int64Array::ensure(array);
  if (!out) throw py::error_already_set();
  return out;
}

bool flag_arg(py::handle value, const char* name) {
  if (!PyBool_Check(value.ptr())) {
    throw py::type_error(std::string(name) + " must be a bool, not " + type_name(value));
  }
  return value.ptr() == Py_True;
}

std::vector<std::string> columns_of(const WindowStoreHandle& handle) {
  return handle.visit([](const auto& s) { return s.columns(); });
}

// Folds in chunks of kInterruptRows (see fold_into in register_aggregate_store.cpp): the
// whole batch's times and NaN are checked first, so a rejected batch folds nothing.
std::size_t fold_batch(const WindowStoreHandle& handle, std::uint32_t pid, py::handle keys,
                       py::handle times, py::handle values, std::int64_t watermark) {
  const std::size_t width = handle.visit([](const auto& s) { return s.width(); });
  const ValueBlock block(values, columns_of(handle), width);
  const Int64Array ts = times_arg(times);
  const std::size_t n = block.rows();
  if (static_cast<std::size_t>(ts.size()) != n) {
    throw InvalidArgument("times and values differ in length: " + std::to_string(ts.size()) +
                          " times, " + std::to_string(n) + " values");
  }
  const double* v = block.data();
  const std::int64_t* t = ts.data();
  const NanPolicy policy = handle.visit([](const auto& s) { return s.nan_policy(); });
  {
    const MaybeReleaseGil release(n * 8);  // reads arrays this frame keeps alive
    handle.visit([&](const auto& s) { s.check_times(t, n); });
  }
  const std::size_t chunk =
      policy == NanPolicy::kRaise && any_nan(v, n * width) ? n + 1 : kInterruptRows;
  std::size_t late = 0;
  if (handle.is_bytes()) {
    const ByteKeyColumn column(keys, "keys");
    check_lengths(column.size(), n);
    std::vector<std::string_view> scratch;
    // Only the column's pinned buffers, the arrays and C++ state are touched while released.
    run_interruptible(n, 16 + 8 * width + column.total_bytes() / (n == 0 ? 1 : n), chunk,
                      [&](std::size_t begin, std::size_t end) {
                        const std::string_view* views = column.chunk_views(begin, end, scratch);
                        late += handle.bytes().fold(pid, views, t + begin, v + begin * width,
                                                    end - begin, watermark);
                      });
  } else {
    const Int64Array ks = int_keys(keys);
    check_lengths(static_cast<std::size_t>(ks.size()), n);
    const std::int64_t* k = ks.data();
    // Only the arrays (kept alive by this frame) and C++ state are touched while released.
    run_interruptible(n, 16 + 8 * width, chunk, [&](std::size_t begin, std::size_t end) {
      late += handle.int64().fold(pid, k + begin, t + begin, v + begin * width, end - begin,
                                  watermark);
    });
  }
  return late;
}

// {"key", "window_start", "window_end", then "{v}_count", "{v}_sum", ... per value column}
// over the core's finished columns, handed over without copying.
template <class K>
py::dict rows_dict(WindowRows<K>&& rows, const std::vector<std::string>& names,
                   KeyFormat format) {
  py::dict out;
  const std::size_t n = rows.size();
  if constexpr (std::is_same_v<K, Int64Keys>) {
    out["key"] = adopt_container<std::int64_t>(std::move(rows.keys.keys));
  } else {
    out["key"] = bytes_key_column(std::move(rows.keys), format);
  }
  out["window_start"] = adopt_container<std::int64_t>(std::move(rows.starts));
  out["window_end"] = adopt_container<std::int64_t>(std::move(rows.ends));
  for (std::size_t c = 0; c < rows.columns.size(); ++c) {
    const std::string prefix = (names.empty() ? std::string("value") : names[c]) + "_";
    StatArrays& s = rows.columns[c];
    out[py::str(prefix + "count")] = adopt(std::move(s.count), n);
    out[py::str(prefix + "sum")] = adopt(std::move(s.sum), n);
    out[py::str(prefix + "min")] = adopt(std::move(s.min), n);
    out[py::str(prefix + "max")] = adopt(std::move(s.max), n);
    out[py::str(prefix + "mean")] = adopt(std::move(s.mean), n);
    out[py::str(prefix + "var")] = adopt(std::move(s.var), n);
    out[py::str(prefix + "std")] = adopt(std::move(s.std), n);
  }
  return out;
}

// Every window whose end <= watermark (all of them when `everything`), as rows_dict.
py::dict emit_rows(const WindowStoreHandle& handle, std::int64_t watermark, bool everything,
                   KeyFormat format) {
  const std::vector<std::string> names = columns_of(handle);
  if (handle.is_bytes()) {
    WindowRows<BytesKeys> rows;
    {
      const py::gil_scoped_release release;  // pure C++ under the store's locks
      rows = everything ? handle.bytes().emit_all() : handle.bytes().emit(watermark);
    }
    return rows_dict(std::move(rows), names, format);
  }
  WindowRows<Int64Keys> rows;
  {
    const py::gil_scoped_release release;  // pure C++ under the store's locks
    rows = everything ? handle.int64().emit_all() : handle.int64().emit(watermark);
  }
  return rows_dict(std::move(rows), names, format);
}

// emit_rows per partition: a list of num_partitions dicts.
template <class K, class Store>
py::list partition_dicts(Store& store, std::int64_t watermark, bool everything,
                         const std::vector<std::string>& names, KeyFormat format) {
  std::vector<WindowRows<K>> parts;
  {
    const py::gil_scoped_release release;  // pure C++ under the store's locks
    parts = everything ? store.emit_all_partitions() : store.emit_partitions(watermark);
  }
  py::list out;
  for (WindowRows<K>& rows : parts) out.append(rows_dict(std::move(rows), names, format));
  return out;
}

py::list emit_partition_rows(const WindowStoreHandle& handle, std::int64_t watermark,
                             bool everything, KeyFormat format) {
  const std::vector<std::string> names = columns_of(handle);
  if (handle.is_bytes()) {
    return partition_dicts<BytesKeys>(handle.bytes(), watermark, everything, names, format);
  }
  return partition_dicts<Int64Keys>(handle.int64(), watermark, everything, names, format);
}

}  // namespace

void register_window_store(py::module_& m) {
  py::class_<WindowPartitionHandle>(m, "WindowPartition", R"doc(
A partition's single-writer fold into its open windows; get one from
WindowedAggregateStore.partition().
)doc")
      .def_property_readonly(
          "partition_id", [](const WindowPartitionHandle& self) { return self.partition_id; },
          "The partition this handle folds for.")
      .def(
          "fold",
          [](const WindowPartitionHandle& self, const py::object& keys, const py::object& times,
             const py::object& values, const py::object& watermark) {
            const auto w = int_arg<std::int64_t>(watermark, "watermark");
            return fold_batch(*self.store, self.partition_id, keys, times, values, w);
          },
          py::arg("keys"), py::arg("times"), py::arg("values"), py::kw_only(),
          py::arg("watermark"),
          "Fold a batch into the partition's open windows with the GIL released: ``keys`` as\n"
          "NumericAggregateStore's fold takes them, ``times`` int64 epoch milliseconds (or\n"
          "datetime64[ms]) of the same length, ``values`` a 1-D float64 array (one value\n"
          "column), an (n, M) array or a mapping {name: array}. Windows whose end <=\n"
          "max(watermark, the store's closed_through) take nothing; returns how many events\n"
          "had every window closed (late, folded nowhere). Bad input raises before any row is\n"
          "folded.")
      .def_property_readonly(
          "open_windows",
          [](const WindowPartitionHandle& self) {
            return self.store->visit(
                [&](const auto& s) { return s.partition_open_windows(self.partition_id); });
          },
          "(key, window) pairs this partition holds.")
      .def("__repr__", [](const WindowPartitionHandle& self) {
        const std::size_t open = self.store->visit(
            [&](const auto& s) { return s.partition_open_windows(self.partition_id); });
        return "WindowPartition(partition_id=" + std::to_string(self.partition_id) +
               ", open_windows=" + std::to_string(open) + ")";
      });

  py::class_<WindowStoreHandle, std::shared_ptr<WindowStoreHandle>>(m, "WindowedAggregateStore",
                                                                     R"doc(
Partition-local numeric partials per (key, event-time window), emitted once the watermark
passes the window's end.
)doc")
      .def(py::init([](const py::object& num_partitions, const py::object& kind,
                       const py::object& size, const py::object& step, const py::object& gap,
                       const py::object& key_type, const py::object& values,
                       const py::object& nan_policy) {
             const auto np = int_arg<std::uint32_t>(num_partitions, "num_partitions", 1,
                                                    kMaxPartitions);
             WindowSpec spec;
             spec.kind = kind_arg(kind);
             spec.size = int_arg<std::int64_t>(size, "size");
             spec.step = int_arg<std::int64_t>(step, "step");
             spec.gap = int_arg<std::int64_t>(gap, "gap");
             const KeyType type = key_type_arg(key_type);
             std::vector<std::string> names = value_names_arg(values);
             const NanPolicy policy = nan_policy_arg(nan_policy);
             return std::make_shared<WindowStoreHandle>(type, np, spec, policy, std::move(names));
           }),
           py::arg("num_partitions"), py::kw_only(), py::arg("kind"), py::arg("size") = 0,
           py::arg("step") = 0, py::arg("gap") = 0, py::arg("key_type") = "bytes",
           py::arg("values") = py::none(), py::arg("nan_policy") = "skip",
           "``num_partitions`` 1 to 65536; ``kind`` 'tumbling' (size), 'hopping' (size and\n"
           "step, size a multiple of step) or 'session' (gap), int64 milliseconds;\n"
           "``key_type`` 'int64' or 'bytes'; ``values`` None (one unnamed value column) or the\n"
           "value columns' names; ``nan_policy`` 'skip', 'propagate' or 'raise'.")
      .def_property_readonly(
          "num_partitions",
          [](const WindowStoreHandle& self) {
            return self.visit([](const auto& s) { return s.num_partitions(); });
          },
          "How many partitions fold into the store.")
      .def_property_readonly(
          "kind",
          [](const WindowStoreHandle& self) {
            return std::string(
                window_kind_name(self.visit([](const auto& s) { return s.spec().kind; })));
          },
          "'tumbling', 'hopping' or 'session'.")
      .def_property_readonly(
          "size",
          [](const WindowStoreHandle& self) {
            return self.visit([](const auto& s) { return s.spec().size; });
          },
          "Window length in milliseconds (0 for sessions).")
      .def_property_readonly(
          "step",
          [](const WindowStoreHandle& self) {
            return self.visit([](const auto& s) { return s.spec().step; });
          },
          "Milliseconds between window starts (the size for tumbling windows, 0 for sessions).")
      .def_property_readonly(
          "gap",
          [](const WindowStoreHandle& self) {
            return self.visit([](const auto& s) { return s.spec().gap; });
          },
          "Session inactivity gap in milliseconds (0 for tumbling and hopping windows).")
      .def_property_readonly(
          "key_type",
          [](const WindowStoreHandle& self) { return std::string(key_type_name(self.key_type())); },
          "'int64' or 'bytes'.")
      .def_property_readonly(
          "nan_policy",
          [](const WindowStoreHandle& self) {
            return std::string(
                nan_policy_name(self.visit([](const auto& s) { return s.nan_policy(); })));
          },
          "'skip', 'propagate' or 'raise'.")
      .def_property_readonly(
          "values",
          [](const WindowStoreHandle& self) -> py::object {
            const std::vector<std::string> names = columns_of(self);
            if (names.empty()) return py::none();
            py::list out;
            for (const std::string& name : names) out.append(py::str(name));
            return out;
          },
          "The value columns' names, or None for the one unnamed column.")
      .def(
          "partition",
          [](const py::object& self, const py::object& partition_id) {
            // Loaded as a reference first: that refuses an uninitialised instance.
            const auto& store = self.cast<const WindowStoreHandle&>();
            const std::uint32_t n = store.visit([](const auto& s) { return s.num_partitions(); });
            return WindowPartitionHandle{
                self.cast<std::shared_ptr<WindowStoreHandle>>(),
                int_arg<std::uint32_t>(partition_id, "partition_id", 0, n - 1)};
          },
          py::arg("partition_id"),
          "The single-writer WindowPartition of ``partition_id`` (one writer thread each).")
      .def(
          "_emit",
          [](const WindowStoreHandle& self, const py::object& watermark,
             const py::object& key_format) {
            const auto w = int_arg<std::int64_t>(watermark, "watermark");
            return emit_rows(self, w, false, key_format_arg(key_format));
          },
          py::arg("watermark"), py::arg("key_format"),
          "Every window whose end <= watermark, removed from the state, as columns sorted by\n"
          "(window_end, window_start, key); byte-string keys as 'bytes' or 'str' (lists) or\n"
          "'arrow' (an (offsets, data) pair in Arrow's binary layout).")
      .def(
          "_emit_all",
          [](const WindowStoreHandle& self, const py::object& key_format) {
            return emit_rows(self, 0, true, key_format_arg(key_format));
          },
          py::arg("key_format"), "Every open window, as _emit gives them.")
      .def(
          "_emit_partitions",
          [](const WindowStoreHandle& self, const py::object& watermark,
             const py::object& key_format) {
            const auto w = int_arg<std::int64_t>(watermark, "watermark");
            return emit_partition_rows(self, w, false, key_format_arg(key_format));
          },
          py::arg("watermark"), py::arg("key_format"),
          "_emit's windows without the sort and the merge: a list of one column dict per\n"
          "partition (its windows by start, a window's keys in the order first folded),\n"
          "written in parallel with the GIL released.")
      .def(
          "_emit_all_partitions",
          [](const WindowStoreHandle& self, const py::object& key_format) {
            return emit_partition_rows(self, 0, true, key_format_arg(key_format));
          },
          py::arg("key_format"), "Every open window, as _emit_partitions gives them.")
      .def_property_readonly(
          "open_windows",
          [](const WindowStoreHandle& self) {
            return self.visit([](const auto& s) { return s.open_windows(); });
          },
          "(key, window) pairs held across partitions.")
      .def(
          "__len__",
          [](const WindowStoreHandle& self) {
            return self.visit([](const auto& s) { return s.open_windows(); });
          },
          "(key, window) pairs held across partitions.")
      .def_property_readonly(
          "closed_through",
          [](const WindowStoreHandle& self) {
            return self.visit([](const auto& s) { return s.closed_through(); });
          },
          "The highest watermark emit() was given (-2**63 for a fresh store): windows ending\n"
          "at or before it never take events again.")
      .def(
          "memory_bytes",
          [](const WindowStoreHandle& self) {
            const py::gil_scoped_release release;
            return self.visit([](const auto& s) { return s.memory_bytes(); });
          },
          "Approximate heap bytes of every partition's windows.")
      .def(
          "snapshot",
          [](const WindowStoreHandle& self) {
            std::string snap;
            {
              const py::gil_scoped_release release;  // pure C++ under the store's locks
              snap = self.visit([](auto& s) { return s.snapshot(); });
            }
            return bytes_recycling(std::move(snap));
          },
          "Every partition's open windows as checksummed bytes; resets the change tracking\n"
          "of snapshot_delta().")
      .def(
          "snapshot_delta",
          [](const WindowStoreHandle& self) {
            std::string delta;
            {
              const py::gil_scoped_release release;  // pure C++ under the store's locks
              delta = self.visit([](auto& s) { return s.snapshot_delta(); });
            }
            return bytes_recycling(std::move(delta));
          },
          "Only the windows changed or emitted since the previous snapshot() or\n"
          "snapshot_delta(), as checksummed bytes naming their parent; resets the change\n"
          "tracking.")
      .def(
          "snapshot_into",
          [](const WindowStoreHandle& self, const py::object& out, const py::object& delta) {
            const bool as_delta = flag_arg(delta, "delta");
            capture_into(out, [&] {
              return self.visit(
                  [as_delta](auto& s) { return as_delta ? s.snapshot_delta() : s.snapshot(); });
            });
          },
          py::arg("out"), py::kw_only(), py::arg("delta") = false,
          "snapshot() (or, with delta=True, snapshot_delta()) written into the bytearray out,\n"
          "resized to the capture's length.")
      .def(
          "restore",
          [](const WindowStoreHandle& self, const py::object& data) {
            require_buffer(data, "data");
            const ImmutableInput input(data);
            const py::gil_scoped_release release;  // decodes memory no other thread can change
            self.visit([&](auto& s) { s.restore(input.view()); });
          },
          py::arg("data"),
          "Replace every partition's windows with a snapshot's. Corrupt or foreign bytes\n"
          "raise CorruptDataError and leave the store as it was.")
      .def(
          "apply_delta",
          [](const WindowStoreHandle& self, const py::object& data) {
            require_buffer(data, "data");
            const ImmutableInput input(data);
            const py::gil_scoped_release release;  // decodes memory no other thread can change
            self.visit([&](auto& s) { s.apply_delta(input.view()); });
          },
          py::arg("data"),
          "Apply a snapshot_delta() taken from this store's current state. Corrupt bytes or a\n"
          "delta of another parent raise CorruptDataError and leave the store as it was.");
}

}  // namespace streamstate::bindings
