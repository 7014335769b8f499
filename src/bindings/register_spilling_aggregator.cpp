#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "bindings/prelude.h"
#include "bindings/stats_columns.h"
#include "core/errors.h"
#include "core/spilling_aggregator.h"

namespace streamstate::bindings {
namespace {

using Int64Array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;
using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

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
  // Same keys, order and dtypes as stats_columns() (NumericAggregateStore.results()), but
  // the columns are the buffers the drain streamed into, so a large result exists once
  // instead of first as Moments and then again as columns.
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

// A bytes/str key as a view valid while `item` lives (str: its cached UTF-8 form).
std::string_view key_view(PyObject* item, std::size_t index) {
  if (PyBytes_Check(item)) {
    return {PyBytes_AS_STRING(item), static_cast<std::size_t>(PyBytes_GET_SIZE(item))};
  }
  if (PyUnicode_Check(item)) {
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(item, &size);
    if (data == nullptr) throw py::error_already_set();
    return {data, static_cast<std::size_t>(size)};
  }
  throw py::type_error("key at index " + std::to_string(index) +
                       " must be bytes or str, not " + std::string(Py_TYPE(item)->tp_name));
}

class SpillingAggregatorCore {
 public:
  SpillingAggregatorCore(const std::string& key_type, std::size_t mem_limit_bytes,
                         const std::string& spill_dir, const std::string& nan_policy,
                         unsigned threads) {
    SpillingAggregatorOptions o;
    o.mem_limit_bytes = mem_limit_bytes;
    o.spill_dir = spill_dir;
    o.nan_policy = parse_nan_policy(nan_policy);
    o.threads = threads;
    if (key_type == "int64") {
      int64_ = std::make_unique<Int64SpillingAggregator>(std::move(o));
    } else if (key_type == "bytes") {
      bytes_ = std::make_unique<BytesSpillingAggregator>(std::move(o));
    } else {
      throw InvalidArgument("key_type must be 'int64' or 'bytes', got '" + key_type + "'");
    }
    key_type_ = key_type;
    nan_policy_ = o.nan_policy;
  }

  void accumulate(const py::handle& key, double value) {
    if (int64_) {
      const auto k = py::cast<std::int64_t>(key);
      // Plain values only. Released so a call waiting for a running batch does not hold
      // every other Python thread up.
      const py::gil_scoped_release release;
      int64_->accumulate(k, value);
    } else {
      const std::string_view k = key_view(key.ptr(), 0);
      // The view points into `key`, which the caller's frame keeps alive.
      const py::gil_scoped_release release;
      bytes_->accumulate(k, value);
    }
  }

  void accumulate_batch(const py::handle& keys, const py::handle& values) {
    const auto vals = DoubleArray::ensure(values);
    if (!vals || vals.ndim() != 1) throw py::type_error("values must be a 1-D float64 array-like");
    const auto n = static_cast<std::size_t>(vals.shape(0));
    const double* v = vals.data();
    if (int64_) {
      const auto ks = Int64Array::ensure(keys);
      if (!ks || ks.ndim() != 1) throw py::type_error("keys must be a 1-D int64 array-like");
      if (static_cast<std::size_t>(ks.shape(0)) != n) length_mismatch(ks.shape(0), n);
      const std::int64_t* k = ks.data();
      // The arrays are pinned by `ks`/`vals` (held with the GIL); the core touches no
      // Python object.
      const py::gil_scoped_release release;
      int64_->accumulate_batch(k, v, n);
      return;
    }
    // Byte-string keys: a tuple pins every key object for the whole call (a list could be
    // mutated by another thread while the GIL is released). Every key is validated before
    // the first row is folded, so a bad key leaves the aggregator untouched.
    const auto items = py::reinterpret_steal<py::tuple>(PySequence_Tuple(keys.ptr()));
    if (!items) throw py::error_already_set();
    if (static_cast<std::size_t>(items.size()) != n) length_mismatch(items.size(), n);
    for (std::size_t i = 0; i < n; ++i) (void)key_view(PyTuple_GET_ITEM(items.ptr(), i), i);
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
      views.clear();
      for (std::size_t i = start; i < end; ++i) {
        views.push_back(key_view(PyTuple_GET_ITEM(items.ptr(), i), i));
      }
      // Views point into key objects pinned by `items`; no Python object is touched.
      const py::gil_scoped_release release;
      bytes_->accumulate_batch(views.data(), v + start, end - start);
    }
  }

  py::dict drain() {
    std::vector<GroupColumns> parts;
    if (int64_) {
      {
        // Pure C++ (tables, spill files, TBB); no Python object is touched.
        const py::gil_scoped_release release;
        parts = int64_->drain();
      }
      py::array_t<std::int64_t> keys = to_array(parts, &GroupColumns::int_keys);
      return columns_dict(std::move(keys), parts);
    }
    {
      const py::gil_scoped_release release;
      parts = bytes_->drain();
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
    if (int64_) int64_->close();
    if (bytes_) bytes_->close();
  }

  [[nodiscard]] py::dict diagnostics() const {
    SpillDiagnostics d;
    {
      const py::gil_scoped_release release;
      d = int64_ ? int64_->diagnostics() : bytes_->diagnostics();
    }
    return diagnostics_dict(d);
  }
  [[nodiscard]] unsigned lanes() const noexcept { return int64_ ? int64_->lanes() : bytes_->lanes(); }
  [[nodiscard]] std::size_t fanout() const noexcept {
    return int64_ ? int64_->fanout() : bytes_->fanout();
  }
  [[nodiscard]] bool closed() const {
    const py::gil_scoped_release release;
    return int64_ ? int64_->closed() : bytes_->closed();
  }
  [[nodiscard]] const std::string& key_type() const noexcept { return key_type_; }

 private:
  [[noreturn]] static void length_mismatch(py::ssize_t keys, std::size_t values) {
    throw InvalidArgument("keys and values differ in length: " + std::to_string(keys) + " keys, " +
                          std::to_string(values) + " values");
  }

  std::unique_ptr<Int64SpillingAggregator> int64_;
  std::unique_ptr<BytesSpillingAggregator> bytes_;
  std::string key_type_;
  NanPolicy nan_policy_ = NanPolicy::kSkip;
};

}  // namespace

void register_spilling_aggregator(py::module_& m) {
  py::class_<SpillingAggregatorCore>(m, "SpillingAggregatorCore",
                                     "Grace-hash spilling group-by; use "
                                     "streamstate.SpillingAggregator.")
      .def(py::init<const std::string&, std::size_t, const std::string&, const std::string&,
                    unsigned>(),
           py::arg("key_type"), py::arg("mem_limit_bytes"), py::arg("spill_dir"),
           py::arg("nan_policy") = "skip", py::arg("threads") = 0)
      .def("accumulate", &SpillingAggregatorCore::accumulate, py::arg("key"), py::arg("value"))
      .def("accumulate_batch", &SpillingAggregatorCore::accumulate_batch, py::arg("keys"),
           py::arg("values"))
      .def("drain", &SpillingAggregatorCore::drain)
      .def("close", &SpillingAggregatorCore::close)
      .def("diagnostics", &SpillingAggregatorCore::diagnostics)
      .def_property_readonly("lanes", &SpillingAggregatorCore::lanes)
      .def_property_readonly("fanout", &SpillingAggregatorCore::fanout)
      .def_property_readonly("closed", &SpillingAggregatorCore::closed)
      .def_property_readonly("key_type", &SpillingAggregatorCore::key_type);
  m.attr("SPILL_MIN_MEM_LIMIT") = kMinSpillMemLimit;
}

}  // namespace streamstate::bindings
