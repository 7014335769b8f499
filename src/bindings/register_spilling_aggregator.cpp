#include <algorithm>
#include <cmath>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "bindings/arguments.h"
#include "bindings/arrays.h"
#include "bindings/buffers.h"
#include "bindings/key_dispatch.h"
#include "bindings/prelude.h"
#include "core/errors.h"
#include "core/spilling_aggregator.h"

namespace streamstate::bindings {
namespace {

// Rows handed to the core per call for byte-string keys: bounds the key-view scratch
// (16 bytes a row) whatever the batch size.
constexpr std::size_t kBytesChunkRows = std::size_t{1} << 16;

// Owns a column's mapped memory on behalf of the numpy array that views it.
struct MappedColumn {
  char* data;
  std::size_t capacity;
  MappedColumn(char* d, std::size_t c) noexcept : data(d), capacity(c) {}
  ~MappedColumn() { GrowableBuffer::free_memory(data, capacity); }
  MappedColumn(const MappedColumn&) = delete;
  MappedColumn& operator=(const MappedColumn&) = delete;
  MappedColumn(MappedColumn&&) = delete;
  MappedColumn& operator=(MappedColumn&&) = delete;
};

// Concatenates the lanes' column into the first lane's buffer (it grows in place, so only
// the other lanes' values are copied) and hands that memory to a numpy array: no second
// copy of the result ever exists.
template <class T>
py::array_t<T> to_array(std::vector<GroupColumns>& parts, ResultColumn<T> GroupColumns::*column) {
  ResultColumn<T>& first = parts.front().*column;
  {
    // Only core-owned buffers are touched.
    const py::gil_scoped_release release;
    for (std::size_t i = 1; i < parts.size(); ++i) first.append(parts[i].*column);
  }
  const std::size_t n = first.size();
  if (n == 0) return py::array_t<T>(0);
  GrowableBuffer& buffer = first.buffer();
  const std::size_t capacity = buffer.capacity();
  auto holder = std::make_unique<MappedColumn>(buffer.release(), capacity);
  first.release();
  T* data = reinterpret_cast<T*>(holder->data);
  py::capsule owner(holder.get(), [](void* p) { delete static_cast<MappedColumn*>(p); });
  (void)holder.release();  // the capsule owns it now
  return py::array_t<T>({static_cast<py::ssize_t>(n)}, {static_cast<py::ssize_t>(sizeof(T))},
                        data, owner);
}

py::dict columns_dict(py::object keys, std::vector<GroupColumns>& parts) {
  // Same keys, order and dtypes as NumericAggregateStore.results(), but the columns are the
  // buffers the drain streamed into, so a large result exists once instead of first as
  // Moments and then again as columns.
  py::dict out;
  out["key"] = std::move(keys);
  out["count"] = to_array(parts, &GroupColumns::count);
  out["sum"] = to_array(parts, &GroupColumns::sum);
  out["min"] = to_array(parts, &GroupColumns::min);
  out["max"] = to_array(parts, &GroupColumns::max);
  out["mean"] = to_array(parts, &GroupColumns::mean);
  out["var"] = to_array(parts, &GroupColumns::var);
  out["std"] = to_array(parts, &GroupColumns::std);
  return out;
}

[[nodiscard]] std::size_t total_rows(const std::vector<GroupColumns>& parts) {
  std::size_t n = 0;
  for (const GroupColumns& p : parts) n += p.size();
  return n;
}

py::dict diagnostics_dict(const SpillDiagnostics& d) {
  py::dict out;
  out["spill_count"] = d.spill_count;
  out["spilled_batch_count"] = d.spilled_batch_count;
  out["total_spilled_bytes"] = d.total_spilled_bytes;
  out["in_memory_groups"] = d.in_memory_groups;
  out["peak_memory_bytes"] = d.peak_memory_bytes;
  out["memory_bytes"] = d.memory_bytes;
  out["spill_depth"] = d.spill_depth;
  out["spill_files"] = d.spill_files;
  return out;
}

class SpillingAggregatorCore {
 public:
  SpillingAggregatorCore(KeyType key_type, SpillingAggregatorOptions options)
      : nan_policy_(options.nan_policy), impl_(key_type, std::move(options)) {}

  void accumulate(const py::handle& key, const py::handle& value) {
    const double v = float_arg(value, "value");
    if (!impl_.is_bytes()) {
      const std::optional<std::int64_t> k = int64_key(key);
      if (!k) {
        PyErr_SetString(PyExc_OverflowError, "key does not fit in int64");
        throw py::error_already_set();
      }
      // Plain values only. Released so a call waiting for a running batch does not hold
      // every other Python thread up.
      const py::gil_scoped_release release;
      impl_.int64().accumulate(*k, v);
      return;
    }
    const KeyBytes k(key, ByteItems::kKeysOrText, "key");
    // The view points into `key` (or its pin), which outlive the call.
    const py::gil_scoped_release release;
    impl_.bytes().accumulate(k.view(), v);
  }

  void accumulate_batch(const py::handle& keys, const py::handle& values) {
    const Float64Array vals = float_values(values);
    const auto n = static_cast<std::size_t>(vals.shape(0));
    const double* v = vals.data();
    if (!impl_.is_bytes()) {
      const Int64Array ks = int_keys(keys);
      check_lengths(static_cast<std::size_t>(ks.shape(0)), n);
      const std::int64_t* k = ks.data();
      // The arrays are pinned by `ks`/`vals` (held with the GIL); the core touches no
      // Python object.
      const py::gil_scoped_release release;
      impl_.int64().accumulate_batch(k, v, n);
      return;
    }
    // Every key is checked and pinned before the first row is folded, so a bad key leaves
    // the aggregator untouched; the views are built one chunk at a time.
    const PinnedByteStrings pinned(keys, ByteItems::kKeysOrText, "keys", /*keep_views=*/false);
    check_lengths(pinned.size(), n);
    if (nan_policy_ == NanPolicy::kRaise) {
      // Whole batch first: chunks after the first must not be the ones to reject it.
      for (std::size_t i = 0; i < n; ++i) {
        if (std::isnan(v[i])) {
          throw InvalidArgument("value at index " + std::to_string(i) +
                                " is NaN and nan_policy is 'raise' (nothing was folded)");
        }
      }
    }
    std::vector<std::string_view> views;
    views.reserve(std::min(n, kBytesChunkRows));
    for (std::size_t start = 0; start < n; start += kBytesChunkRows) {
      const std::size_t end = std::min(n, start + kBytesChunkRows);
      pinned.fill_views(start, end, views);
      // Views point into key objects pinned by `pinned`; no Python object is touched.
      const py::gil_scoped_release release;
      impl_.bytes().accumulate_batch(views.data(), v + start, end - start);
    }
  }

  py::dict drain() {
    std::vector<GroupColumns> parts;
    if (!impl_.is_bytes()) {
      {
        // Pure C++ (tables, spill files, TBB); no Python object is touched.
        const py::gil_scoped_release release;
        parts = impl_.int64().drain();
      }
      py::array_t<std::int64_t> keys = to_array(parts, &GroupColumns::int_keys);
      return columns_dict(std::move(keys), parts);
    }
    {
      const py::gil_scoped_release release;
      parts = impl_.bytes().drain();
    }
    const std::size_t total = total_rows(parts);
    py::list keys(static_cast<py::ssize_t>(total));
    py::ssize_t i = 0;
    for (GroupColumns& p : parts) {
      p.bytes_keys.for_each([&](std::string_view k) {
        PyObject* b = PyBytes_FromStringAndSize(k.data(), static_cast<Py_ssize_t>(k.size()));
        if (b == nullptr) throw py::error_already_set();
        PyList_SET_ITEM(keys.ptr(), i++, b);
      });
      p.bytes_keys.release();
    }
    return columns_dict(std::move(keys), parts);
  }

  // These wait for a running call to finish (the core serialises calls), so they release
  // the GIL while they wait; none touches a Python object meanwhile.
  void close() {
    const py::gil_scoped_release release;
    impl_.visit([](auto& a) { a.close(); });
  }

  [[nodiscard]] py::dict diagnostics() const {
    SpillDiagnostics d;
    {
      const py::gil_scoped_release release;
      d = impl_.visit([](const auto& a) { return a.diagnostics(); });
    }
    return diagnostics_dict(d);
  }
  [[nodiscard]] unsigned lanes() const {
    return impl_.visit([](const auto& a) { return a.lanes(); });
  }
  [[nodiscard]] std::size_t fanout() const {
    return impl_.visit([](const auto& a) { return a.fanout(); });
  }
  [[nodiscard]] bool closed() const {
    const py::gil_scoped_release release;
    return impl_.visit([](const auto& a) { return a.closed(); });
  }
  [[nodiscard]] std::string key_type() const { return std::string(key_type_name(impl_.key_type())); }

 private:
  NanPolicy nan_policy_;
  KeyDispatch<Int64SpillingAggregator, BytesSpillingAggregator> impl_;
};

}  // namespace

void register_spilling_aggregator(py::module_& m) {
  py::class_<SpillingAggregatorCore>(m, "SpillingAggregatorCore", R"doc(
Grace-hash spilling group-by (the engine of streamstate.SpillingAggregator; use that).
)doc")
      .def(py::init([](const py::object& key_type, const py::object& mem_limit_bytes,
                       const py::object& spill_dir, const py::object& nan_policy,
                       const py::object& threads) {
             const KeyType type = key_type_arg(key_type);
             SpillingAggregatorOptions options;
             options.nan_policy = nan_policy_arg(nan_policy);
             options.mem_limit_bytes = int_arg<std::size_t>(mem_limit_bytes, "mem_limit_bytes");
             options.spill_dir = str_arg(spill_dir, "spill_dir");
             options.threads = int_arg<unsigned>(threads, "threads");
             return std::make_unique<SpillingAggregatorCore>(type, std::move(options));
           }),
           py::arg("key_type"), py::arg("mem_limit_bytes"), py::arg("spill_dir"),
           py::arg("nan_policy") = "skip", py::arg("threads") = 0,
           "``key_type`` 'int64' or 'bytes'; ``mem_limit_bytes`` 0 (no limit) or at least\n"
           "SPILL_MIN_MEM_LIMIT; spill files go in the existing directory ``spill_dir``;\n"
           "``threads`` 0 means one lane per core.")
      .def("accumulate", &SpillingAggregatorCore::accumulate, py::arg("key"), py::arg("value"),
           "Fold one (key, value) row.")
      .def("accumulate_batch", &SpillingAggregatorCore::accumulate_batch, py::arg("keys"),
           py::arg("values"),
           "Fold a batch (GIL released, all lanes); bad input raises before any row is folded.")
      .def("drain", &SpillingAggregatorCore::drain,
           "Merge everything into one result per key (the NumericAggregateStore.results()\n"
           "columns) and delete the spill files; terminal.")
      .def("close", &SpillingAggregatorCore::close,
           "Free the memory and delete the spill files (idempotent).")
      .def("diagnostics", &SpillingAggregatorCore::diagnostics,
           "Spill counters: spill_count, spilled_batch_count, total_spilled_bytes,\n"
           "in_memory_groups, peak_memory_bytes, memory_bytes, spill_depth, spill_files.")
      .def_property_readonly("lanes", &SpillingAggregatorCore::lanes,
                             "Worker lanes, each owning a share of the keys and of the memory.")
      .def_property_readonly("fanout", &SpillingAggregatorCore::fanout,
                             "Partitions per lane and per repartitioning level.")
      .def_property_readonly("closed", &SpillingAggregatorCore::closed,
                             "True after drain, close or a failed spill.")
      .def_property_readonly("key_type", &SpillingAggregatorCore::key_type, "'int64' or 'bytes'.");
  m.attr("SPILL_MIN_MEM_LIMIT") = kMinSpillMemLimit;
}

}  // namespace streamstate::bindings
