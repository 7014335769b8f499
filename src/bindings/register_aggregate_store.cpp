#include "bindings/prelude.h"
#include "bindings/stats_columns.h"
#include "core/aggregate_store.h"
#include "core/byte_io.h"
#include "core/errors.h"
#include "core/numeric_aggregate_store.h"
#include "core/stats.h"

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace streamstate::bindings {
namespace {

std::uint32_t checked_partition(std::int64_t partition_id, std::uint32_t num_partitions) {
  if (partition_id < 0 || partition_id >= static_cast<std::int64_t>(num_partitions)) {
    throw InvalidArgument("partition_id " + std::to_string(partition_id) + " out of range [0, " +
                          std::to_string(num_partitions) + ")");
  }
  return static_cast<std::uint32_t>(partition_id);
}

std::uint32_t checked_num_partitions(std::int64_t n, std::int64_t max) {
  if (n < 1 || n > max) {
    throw InvalidArgument("num_partitions must be between 1 and " + std::to_string(max) +
                          ", got " + std::to_string(n));
  }
  return static_cast<std::uint32_t>(n);
}

// A sequence of byte strings pinned for use without the GIL: the items are copied into a
// private tuple (so another thread mutating the caller's list cannot free them), bytes and
// str are viewed in place (both immutable; str as its cached UTF-8), and any other buffer
// is held through the buffer protocol (which also stops a bytearray from resizing).
class PinnedByteStrings {
 public:
  PinnedByteStrings(const py::handle& sequence, bool allow_str, const char* what) {
    if (PyUnicode_Check(sequence.ptr()) || PyBytes_Check(sequence.ptr())) {
      throw py::type_error(std::string(what) + " must be a sequence of byte strings, not a " +
                           "single " + py::str(py::type::handle_of(sequence).attr("__name__"))
                                           .cast<std::string>());
    }
    PyObject* tuple = PySequence_Tuple(sequence.ptr());
    if (tuple == nullptr) throw py::error_already_set();
    items_ = py::reinterpret_steal<py::tuple>(tuple);
    const auto n = static_cast<std::size_t>(PyTuple_GET_SIZE(tuple));
    views_.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      PyObject* item = PyTuple_GET_ITEM(tuple, static_cast<Py_ssize_t>(i));
      if (PyBytes_Check(item)) {
        views_.emplace_back(PyBytes_AS_STRING(item), static_cast<std::size_t>(PyBytes_GET_SIZE(item)));
      } else if (allow_str && PyUnicode_Check(item)) {
        Py_ssize_t size = 0;
        const char* data = PyUnicode_AsUTF8AndSize(item, &size);
        if (data == nullptr) throw py::error_already_set();
        views_.emplace_back(data, static_cast<std::size_t>(size));
      } else if (PyObject_CheckBuffer(item) != 0) {
        pins_.push_back(std::make_unique<BufferView>(item));
        views_.push_back(pins_.back()->view());
      } else {
        throw py::type_error(std::string(what) + "[" + std::to_string(i) + "] must be " +
                             (allow_str ? "bytes or str" : "bytes-like") + ", not " +
                             py::str(py::type::handle_of(item).attr("__name__")).cast<std::string>());
      }
      total_ += views_.back().size();
    }
  }

  [[nodiscard]] const std::vector<std::string_view>& views() const noexcept { return views_; }
  [[nodiscard]] std::size_t total_bytes() const noexcept { return total_; }

 private:
  py::tuple items_;
  std::vector<std::unique_ptr<BufferView>> pins_;
  std::vector<std::string_view> views_;
  std::size_t total_ = 0;
};

std::string_view key_bytes(const py::handle& key, bool allow_str, std::string& storage) {
  if (PyBytes_Check(key.ptr())) {
    return {PyBytes_AS_STRING(key.ptr()), static_cast<std::size_t>(PyBytes_GET_SIZE(key.ptr()))};
  }
  if (allow_str && PyUnicode_Check(key.ptr())) {
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(key.ptr(), &size);
    if (data == nullptr) throw py::error_already_set();
    return {data, static_cast<std::size_t>(size)};
  }
  if (PyObject_CheckBuffer(key.ptr()) != 0) {
    const BufferView view(key);
    storage.assign(view.view());
    return storage;
  }
  throw py::type_error(std::string("key must be ") + (allow_str ? "bytes or str" : "bytes-like") +
                       ", not " + py::str(py::type::handle_of(key).attr("__name__")).cast<std::string>());
}

// ---------------------------------------------------------------------------------------
// Numeric store: one Python class over the two key flavours.

using Int64Store = NumericAggregateStore<Int64Keys>;
using BytesStore = NumericAggregateStore<BytesKeys>;

struct NumericStoreHandle {
  std::variant<std::unique_ptr<Int64Store>, std::unique_ptr<BytesStore>> store;

  [[nodiscard]] bool is_bytes() const noexcept { return store.index() == 1; }
  template <class F>
  decltype(auto) visit(F&& f) {
    return std::visit([&](auto& s) -> decltype(auto) { return f(*s); }, store);
  }
  template <class F>
  decltype(auto) visit(F&& f) const {
    return std::visit([&](const auto& s) -> decltype(auto) { return f(*s); }, store);
  }
  [[nodiscard]] std::uint32_t num_partitions() const {
    return visit([](const auto& s) { return s.num_partitions(); });
  }
};

std::string_view nan_policy_name(NanPolicy p) {
  switch (p) {
    case NanPolicy::kSkip:
      return "skip";
    case NanPolicy::kPropagate:
      return "propagate";
    case NanPolicy::kRaise:
      return "raise";
  }
  return "skip";
}

using Float64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;
using Int64Array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

Float64Array float_values(const py::handle& values) {
  auto arr = Float64Array::ensure(values);
  if (!arr) {
    throw py::type_error("values must be a float64 array-like (numbers), got " +
                         py::str(py::type::handle_of(values).attr("__name__")).cast<std::string>());
  }
  if (arr.ndim() != 1) {
    throw InvalidArgument("values must be one-dimensional, got " + std::to_string(arr.ndim()) +
                          " dimensions");
  }
  return arr;
}

// int64 keys from any signed integer array-like, or unsigned up to 32 bits; floats, bools
// and uint64 are refused rather than silently truncated or wrapped.
Int64Array int_keys(const py::handle& keys) {
  if (PyUnicode_Check(keys.ptr()) || PyBytes_Check(keys.ptr())) {
    throw py::type_error("keys must be an integer array for key_type='int64'");
  }
  auto arr = py::array::ensure(keys);
  if (!arr) throw py::type_error("keys must be an integer array-like for key_type='int64'");
  if (arr.ndim() != 1) {
    throw InvalidArgument("keys must be one-dimensional, got " + std::to_string(arr.ndim()) +
                          " dimensions");
  }
  const char kind = arr.dtype().kind();
  const bool integer = kind == 'i' || (kind == 'u' && arr.dtype().itemsize() <= 4);
  if (!integer && arr.size() > 0) {
    throw py::type_error("keys must be int32 or int64 for key_type='int64', got dtype " +
                         py::str(arr.dtype()).cast<std::string>() +
                         (kind == 'f' ? " (cast float keys explicitly with .astype('int64'))" : ""));
  }
  auto out = Int64Array::ensure(arr);
  if (!out) throw py::error_already_set();
  return out;
}

void check_lengths(std::size_t keys, std::size_t values) {
  if (keys != values) {
    throw InvalidArgument("keys and values differ in length: " + std::to_string(keys) + " vs " +
                          std::to_string(values));
  }
}

void fold_into(NumericStoreHandle& handle, std::uint32_t pid, const py::handle& keys,
               const py::handle& values) {
  const Float64Array vals = float_values(values);
  const auto n = static_cast<std::size_t>(vals.size());
  if (handle.is_bytes()) {
    const PinnedByteStrings pinned(keys, /*allow_str=*/true, "keys");
    check_lengths(pinned.views().size(), n);
    auto& store = *std::get<1>(handle.store);
    // Only pinned, immutable buffers and C++ state are touched while released.
    const MaybeReleaseGil release(n * 16 + pinned.total_bytes());
    store.fold(pid, pinned.views().data(), vals.data(), n);
  } else {
    const Int64Array ks = int_keys(keys);
    check_lengths(static_cast<std::size_t>(ks.size()), n);
    auto& store = *std::get<0>(handle.store);
    // Only the arrays (kept alive by this frame) and C++ state are touched while released.
    const MaybeReleaseGil release(n * 16);
    store.fold(pid, ks.data(), vals.data(), n);
  }
}

py::object result_tuple(const NumericStoreHandle& handle, const py::handle& key) {
  std::optional<Moments> m;
  if (handle.is_bytes()) {
    std::string storage;
    const std::string_view k = key_bytes(key, /*allow_str=*/true, storage);
    m = std::get<1>(handle.store)->result(k);
  } else {
    if (PyFloat_Check(key.ptr()) || PyBool_Check(key.ptr()) || !PyIndex_Check(key.ptr())) {
      throw py::type_error("key must be an int for key_type='int64', not " +
                           py::str(py::type::handle_of(key).attr("__name__")).cast<std::string>());
    }
    const py::object index = py::reinterpret_steal<py::object>(PyNumber_Index(key.ptr()));
    if (!index) throw py::error_already_set();
    int overflow = 0;
    const long long value = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (value == -1 && PyErr_Occurred() != nullptr) throw py::error_already_set();
    if (overflow != 0) return py::none();  // outside int64: no such key can exist
    m = std::get<0>(handle.store)->result(static_cast<std::int64_t>(value));
  }
  if (!m) return py::none();
  return stats_tuple(*m);
}

// A numpy array that takes ownership of a C++ buffer (freed when the array is collected).
template <class T>
py::array_t<T> adopt(std::unique_ptr<T[]> data, std::size_t n) {
  const py::capsule owner(data.get(), [](void* p) { delete[] static_cast<T*>(p); });
  T* raw = data.release();  // the capsule owns it from here on
  return py::array_t<T>(static_cast<py::ssize_t>(n), raw, owner);
}

// The same {"key", "count", "sum", "min", "max", "mean", "var", "std"} dict as
// stats_columns() (the shape streamstate.stats.STAT_COLUMNS describes), built from
// columns the core already finished, without copying them.
py::dict adopt_columns(py::object keys, StatArrays&& c) {
  const std::size_t n = c.size;
  py::dict out;
  out["key"] = std::move(keys);
  out["count"] = adopt(std::move(c.count), n);
  out["sum"] = adopt(std::move(c.sum), n);
  out["min"] = adopt(std::move(c.min), n);
  out["max"] = adopt(std::move(c.max), n);
  out["mean"] = adopt(std::move(c.mean), n);
  out["var"] = adopt(std::move(c.var), n);
  out["std"] = adopt(std::move(c.std), n);
  return out;
}

py::dict results_columns(const NumericStoreHandle& handle) {
  StatArrays columns;
  if (handle.is_bytes()) {
    BytesKeys::KeyColumn keys;
    {
      // Copies out under the store's lock; Python objects are built after it is released.
      const py::gil_scoped_release release;
      std::get<1>(handle.store)->result_columns(keys, columns);
    }
    py::list column(static_cast<py::ssize_t>(keys.size()));
    std::size_t begin = 0;
    for (std::size_t i = 0; i < keys.size(); ++i) {
      const std::size_t end = keys.ends[i];
      column[static_cast<py::ssize_t>(i)] = py::bytes(keys.bytes.data() + begin, end - begin);
      begin = end;
    }
    return adopt_columns(std::move(column), std::move(columns));
  }
  Int64Keys::KeyColumn keys;
  {
    const py::gil_scoped_release release;  // pure C++ copy-out under the store's lock
    std::get<0>(handle.store)->result_columns(keys, columns);
  }
  auto key_data = std::make_unique_for_overwrite<std::int64_t[]>(keys.size());
  if (!keys.keys.empty()) {
    std::memcpy(key_data.get(), keys.keys.data(), keys.keys.size() * sizeof(std::int64_t));
  }
  return adopt_columns(adopt(std::move(key_data), keys.size()), std::move(columns));
}

struct PartitionHandle {
  std::shared_ptr<NumericStoreHandle> store;
  std::uint32_t partition_id;
};

std::string moments_bytes(const Moments& m) {
  std::string out;
  m.encode(out);
  return out;
}

Moments moments_from(const py::bytes& data) {
  const std::string_view view = data;
  ByteReader in(view, "moments");
  Moments m = Moments::decode(in);
  if (!in.at_end()) throw CorruptDataError("moments: trailing bytes");
  return m;
}

void register_opaque_store(py::module_& m) {
  py::class_<AggregateStore, std::shared_ptr<AggregateStore>>(
      m, "AggregateStore",
      "Opaque partial aggregates published by partitions under (group_key, partition_id).")
      .def(py::init([](std::int64_t num_partitions) {
             return std::make_shared<AggregateStore>(
                 checked_num_partitions(num_partitions, 65536));
           }),
           py::arg("num_partitions"))
      .def_property_readonly("num_partitions", &AggregateStore::num_partitions)
      .def("__len__", &AggregateStore::size)
      .def("is_empty", &AggregateStore::empty)
      .def(
          "publish",
          [](AggregateStore& self, const py::bytes& group_key, std::int64_t partition_id,
             const py::object& partial) {
            const std::uint32_t pid = checked_partition(partition_id, self.num_partitions());
            const BufferView value(partial);
            const std::string_view key = group_key;
            // The key is an immutable bytes object and the value is pinned by its buffer.
            const MaybeReleaseGil release(value.size());
            self.publish(key, pid, value.view());
          },
          py::arg("group_key"), py::arg("partition_id"), py::arg("partial"))
      .def(
          "publish_many",
          [](AggregateStore& self, std::int64_t partition_id, const py::object& keys,
             const py::object& partials) {
            const std::uint32_t pid = checked_partition(partition_id, self.num_partitions());
            const PinnedByteStrings k(keys, /*allow_str=*/false, "keys");
            const PinnedByteStrings v(partials, /*allow_str=*/false, "partials");
            // Every key and partial is pinned above; the map work needs no Python state.
            const py::gil_scoped_release release;
            self.publish_many(pid, k.views(), v.views());
          },
          py::arg("partition_id"), py::arg("keys"), py::arg("partials"))
      .def(
          "get_partial",
          [](const AggregateStore& self, const py::bytes& group_key,
             std::int64_t partition_id) -> py::object {
            const std::uint32_t pid = checked_partition(partition_id, self.num_partitions());
            std::optional<std::string> partial = self.get_partial(group_key, pid);
            if (!partial) return py::none();
            return py::bytes(*partial);
          },
          py::arg("group_key"), py::arg("partition_id"))
      .def(
          "collect_partials",
          [](const AggregateStore& self, const py::bytes& group_key) {
            const std::string_view key = group_key;
            std::vector<std::pair<std::uint32_t, std::string>> partials;
            {
              const py::gil_scoped_release release;  // key is an immutable bytes object
              partials = self.collect_partials(key);
            }
            py::list out;
            for (auto& [pid, partial] : partials) out.append(py::make_tuple(pid, py::bytes(partial)));
            return out;
          },
          py::arg("group_key"))
      .def(
          "remove_group",
          [](AggregateStore& self, const py::bytes& group_key) {
            return self.remove_group(group_key);
          },
          py::arg("group_key"))
      .def("groups",
           [](const AggregateStore& self) {
             std::vector<std::string> groups;
             {
               const py::gil_scoped_release release;  // pure C++ copy-out
               groups = self.groups();
             }
             py::list out(static_cast<py::ssize_t>(groups.size()));
             for (std::size_t i = 0; i < groups.size(); ++i) {
               out[static_cast<py::ssize_t>(i)] = py::bytes(groups[i]);
             }
             return out;
           })
      .def("snapshot",
           [](const AggregateStore& self) {
             std::string snap;
             {
               const py::gil_scoped_release release;  // pure C++ under the store's lock
               snap = self.snapshot();
             }
             return py::bytes(snap);
           })
      .def(
          "restore",
          [](AggregateStore& self, const py::object& data) {
            const BufferView buffer(data);
            const py::gil_scoped_release release;  // the buffer is pinned above
            self.restore(buffer.view());
          },
          py::arg("data"))
      .def("memory_bytes", [](const AggregateStore& self) {
        const py::gil_scoped_release release;
        return self.memory_bytes();
      });
}

void register_numeric_store(py::module_& m) {
  py::class_<PartitionHandle>(m, "PartitionAggregator",
                              "A partition's single-writer local fold; see NumericAggregateStore.")
      .def_property_readonly("partition_id",
                             [](const PartitionHandle& self) { return self.partition_id; })
      .def(
          "fold",
          [](PartitionHandle& self, const py::object& keys, const py::object& values) {
            fold_into(*self.store, self.partition_id, keys, values);
          },
          py::arg("keys"), py::arg("values"))
      .def("publish",
           [](PartitionHandle& self) {
             // Only C++ state is touched.
             const py::gil_scoped_release release;
             return self.store->visit([&](auto& s) { return s.publish(self.partition_id); });
           })
      .def("__len__",
           [](const PartitionHandle& self) {
             return self.store->visit(
                 [&](const auto& s) { return s.partition_size(self.partition_id); });
           })
      .def_property_readonly("pending",
                             [](const PartitionHandle& self) {
                               return self.store->visit([&](const auto& s) {
                                 return s.partition_pending(self.partition_id);
                               });
                             })
      .def("memory_bytes",
           [](const PartitionHandle& self) {
             return self.store->visit(
                 [&](const auto& s) { return s.partition_memory_bytes(self.partition_id); });
           })
      .def("__enter__", [](const py::object& self) { return self; })
      .def(
          "__exit__",
          [](PartitionHandle& self, const py::object& exc_type, const py::object& /*exc*/,
             const py::object& /*tb*/) {
            if (exc_type.is_none()) {
              const py::gil_scoped_release release;  // only C++ state
              self.store->visit([&](auto& s) { return s.publish(self.partition_id); });
            }
            return false;
          },
          py::arg("exc_type"), py::arg("exc"), py::arg("tb"))
      .def("__repr__", [](const PartitionHandle& self) {
        const auto [size, pending] = self.store->visit([&](const auto& s) {
          return std::pair{s.partition_size(self.partition_id),
                           s.partition_pending(self.partition_id)};
        });
        return "PartitionAggregator(partition_id=" + std::to_string(self.partition_id) +
               ", keys=" + std::to_string(size) + ", pending=" + std::to_string(pending) + ")";
      });

  py::class_<NumericStoreHandle, std::shared_ptr<NumericStoreHandle>>(
      m, "NumericAggregateStore",
      "count/sum/min/max/mean/var per key, folded per partition and merged across them.")
      .def(py::init([](std::int64_t num_partitions, std::string_view key_type,
                       std::string_view nan_policy) {
             const std::uint32_t np = checked_num_partitions(num_partitions, 65536);
             const NanPolicy policy = parse_nan_policy(nan_policy);
             auto handle = std::make_shared<NumericStoreHandle>();
             if (key_type == "int64") {
               handle->store = std::make_unique<Int64Store>(np, policy);
             } else if (key_type == "bytes") {
               handle->store = std::make_unique<BytesStore>(np, policy);
             } else {
               throw InvalidArgument("key_type must be 'int64' or 'bytes', got '" +
                                     std::string(key_type) + "'");
             }
             return handle;
           }),
           py::arg("num_partitions"), py::arg("key_type") = "int64",
           py::arg("nan_policy") = "skip")
      .def_property_readonly("num_partitions", &NumericStoreHandle::num_partitions)
      .def_property_readonly("key_type",
                             [](const NumericStoreHandle& self) {
                               return self.is_bytes() ? "bytes" : "int64";
                             })
      .def_property_readonly("nan_policy",
                             [](const NumericStoreHandle& self) {
                               return std::string(nan_policy_name(
                                   self.visit([](const auto& s) { return s.nan_policy(); })));
                             })
      .def(
          "partition",
          [](const std::shared_ptr<NumericStoreHandle>& self, std::int64_t partition_id) {
            return PartitionHandle{self, checked_partition(partition_id, self->num_partitions())};
          },
          py::arg("partition_id"))
      .def("__len__",
           [](const NumericStoreHandle& self) {
             return self.visit([](const auto& s) { return s.size(); });
           })
      .def("_result_tuple", &result_tuple, py::arg("key"))
      .def("results", &results_columns)
      .def("snapshot",
           [](const NumericStoreHandle& self) {
             std::string snap;
             {
               const py::gil_scoped_release release;  // pure C++ under the store's locks
               snap = self.visit([](const auto& s) { return s.snapshot(); });
             }
             return py::bytes(snap);
           })
      .def(
          "restore",
          [](NumericStoreHandle& self, const py::object& data) {
            const BufferView buffer(data);
            const py::gil_scoped_release release;  // the buffer is pinned above
            self.visit([&](auto& s) { s.restore(buffer.view()); });
          },
          py::arg("data"))
      .def("memory_bytes", [](const NumericStoreHandle& self) {
        const py::gil_scoped_release release;
        return self.visit([](const auto& s) { return s.memory_bytes(); });
      });

  // Partial-level helpers (encoded Moments) used by the merge-law property tests.
  m.def(
      "_moments_of",
      [](const py::object& values) {
        const Float64Array vals = float_values(values);
        Moments acc;
        for (py::ssize_t i = 0; i < vals.size(); ++i) acc.add(vals.data()[i]);
        return py::bytes(moments_bytes(acc));
      },
      py::arg("values"));
  m.def(
      "_moments_merge",
      [](const py::bytes& a, const py::bytes& b) {
        Moments acc = moments_from(a);
        acc.merge(moments_from(b));
        return py::bytes(moments_bytes(acc));
      },
      py::arg("a"), py::arg("b"));
  m.def(
      "_moments_stats", [](const py::bytes& a) { return stats_tuple(moments_from(a)); },
      py::arg("partial"));
}

}  // namespace

void register_aggregate_store(py::module_& m) {
  register_opaque_store(m);
  register_numeric_store(m);
}

}  // namespace streamstate::bindings
