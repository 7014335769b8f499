#include "bindings/arguments.h"
#include "bindings/arrays.h"
#include "bindings/buffers.h"
#include "bindings/key_columns.h"
#include "bindings/key_dispatch.h"
#include "bindings/prelude.h"
#include "bindings/result_arrays.h"
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
#include <vector>

namespace streamstate::bindings {
namespace {

// The cores' limit: each partition owns a table.
constexpr std::uint32_t kMaxPartitions = 65536;

std::uint32_t partition_arg(py::handle partition_id, std::uint32_t num_partitions) {
  return int_arg<std::uint32_t>(partition_id, "partition_id", 0, num_partitions - 1);
}

std::uint32_t num_partitions_arg(py::handle n) {
  return int_arg<std::uint32_t>(n, "num_partitions", 1, kMaxPartitions);
}

// ---------------------------------------------------------------------------------------
// Numeric store: one Python class over the two key flavours.

using Int64Store = NumericAggregateStore<Int64Keys>;
using BytesStore = NumericAggregateStore<BytesKeys>;
using NumericStoreHandle = KeyDispatch<Int64Store, BytesStore>;

// (count, sum, min, max, mean, var, std) — the fields of streamstate.Stats, in order.
py::tuple stats_tuple(const Moments& m) {
  return py::make_tuple(m.count, m.sum, m.min, m.max, m.mean(), m.var(), m.stddev());
}

// Folds in chunks of kInterruptRows (arrays.h), checking for signals between chunks, so
// Ctrl-C stops a long fold quickly. On KeyboardInterrupt the chunks already folded stay
// folded (as if the batch had been cut short there); nothing is half-folded. A batch the
// core will reject (a NaN under nan_policy='raise') goes in whole instead, so the core
// rejects it before any row is folded.
void fold_into(const NumericStoreHandle& handle, std::uint32_t pid, py::handle keys,
               py::handle values) {
  const Float64Array vals = float_values(values);
  const auto n = static_cast<std::size_t>(vals.size());
  const double* v = vals.data();
  const NanPolicy policy = handle.visit([](const auto& s) { return s.nan_policy(); });
  const std::size_t chunk = policy == NanPolicy::kRaise && any_nan(v, n) ? n + 1 : kInterruptRows;
  if (handle.is_bytes()) {
    const ByteKeyColumn column(keys, "keys");
    check_lengths(column.size(), n);
    std::vector<std::string_view> scratch;
    // Only the column's pinned buffers and C++ state are touched while released.
    run_interruptible(n, 16 + column.total_bytes() / (n == 0 ? 1 : n), chunk,
                      [&](std::size_t begin, std::size_t end) {
                        const std::string_view* views = column.chunk_views(begin, end, scratch);
                        handle.bytes().fold(pid, views, v + begin, end - begin);
                      });
  } else {
    const Int64Array ks = int_keys(keys);
    check_lengths(static_cast<std::size_t>(ks.size()), n);
    const std::int64_t* k = ks.data();
    // Only the arrays (kept alive by this frame) and C++ state are touched while released.
    run_interruptible(n, 16, chunk, [&](std::size_t begin, std::size_t end) {
      handle.int64().fold(pid, k + begin, v + begin, end - begin);
    });
  }
}

py::object result_tuple(const NumericStoreHandle& handle, py::handle key) {
  std::optional<Moments> m;
  if (handle.is_bytes()) {
    const KeyBytes k(key, ByteItems::kKeysOrText, "key");
    m = handle.bytes().result(k.view());
  } else {
    const std::optional<std::int64_t> k = int64_key(key);
    if (!k) return py::none();  // outside int64: no such key can exist
    m = handle.int64().result(*k);
  }
  if (!m) return py::none();
  return stats_tuple(*m);
}

// The {"key", "count", "sum", "min", "max", "mean", "var", "std"} dict (the shape
// streamstate.stats.STAT_COLUMNS describes), built from columns the core already finished,
// without copying them.
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

// Byte-string keys in `format`; the Arrow form hands the key bytes over without a copy.
py::object bytes_key_column(BytesKeys::KeyColumn&& keys, KeyFormat format) {
  if (format == KeyFormat::kArrow) {
    ArrowOffsets offsets = [&] {
      const py::gil_scoped_release release;  // pure C++ over the column this call owns
      return arrow_offsets(keys.ends);
    }();
    std::vector<std::size_t>().swap(keys.ends);
    return arrow_key_buffers(offsets, adopt_container<std::uint8_t>(std::move(keys.bytes)));
  }
  KeyList column(keys.size(), format == KeyFormat::kStr);
  const std::string_view bytes = keys.bytes;
  std::size_t begin = 0;
  for (const std::size_t end : keys.ends) {
    column.append(bytes.substr(begin, end - begin));
    begin = end;
  }
  return column.take();
}

py::dict results_columns(const NumericStoreHandle& handle, KeyFormat format) {
  StatArrays columns;
  if (handle.is_bytes()) {
    BytesKeys::KeyColumn keys;
    {
      // Copies out under the store's lock; Python objects are built after it is released.
      const py::gil_scoped_release release;
      handle.bytes().result_columns(keys, columns);
    }
    return adopt_columns(bytes_key_column(std::move(keys), format), std::move(columns));
  }
  Int64Keys::KeyColumn keys;
  {
    const py::gil_scoped_release release;  // pure C++ copy-out under the store's lock
    handle.int64().result_columns(keys, columns);
  }
  return adopt_columns(adopt_container<std::int64_t>(std::move(keys.keys)), std::move(columns));
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

Moments moments_from(py::handle data, const char* name) {
  require_buffer(data, name);
  const ImmutableInput input(data);
  ByteReader in(input.view(), "moments");
  Moments m = Moments::decode(in);
  if (!in.at_end()) throw CorruptDataError("moments: trailing bytes");
  return m;
}

void register_opaque_store(py::module_& m) {
  py::class_<AggregateStore, std::shared_ptr<AggregateStore>>(m, "AggregateStore", R"doc(
Opaque partial aggregates (bytes) published by partitions under (group_key, partition_id).

The caller serialises and merges partials; the store keeps the latest one of each partition
per group, snapshots consistently while others publish, and restores atomically.
)doc")
      .def(py::init([](const py::object& num_partitions) {
             return std::make_shared<AggregateStore>(num_partitions_arg(num_partitions));
           }),
           py::arg("num_partitions"),
           "Create an empty store for ``num_partitions`` partitions (1 to 65536).")
      .def_property_readonly("num_partitions", &AggregateStore::num_partitions,
                             "How many partitions publish into the store.")
      .def("__len__", &AggregateStore::size, "Entries: (group, partition) pairs held.")
      .def("is_empty", &AggregateStore::empty, "True when no partial is held.")
      .def(
          "publish",
          [](AggregateStore& self, const py::object& group_key, const py::object& partition_id,
             const py::object& partial) {
            const KeyBytes key(group_key, ByteItems::kKeys, "group_key");
            const std::uint32_t pid = partition_arg(partition_id, self.num_partitions());
            require_buffer(partial, "partial");
            const BufferView value(partial);
            // Both are pinned (lengths fixed); the store copies each byte once.
            const MaybeReleaseGil release(value.size());
            self.publish(key.view(), pid, value.view());
          },
          py::arg("group_key"), py::arg("partition_id"), py::arg("partial"),
          "Store ``partial`` (bytes-like) as ``partition_id``'s partial for ``group_key``\n"
          "(bytes), replacing that partition's previous one.")
      .def(
          "publish_many",
          [](AggregateStore& self, const py::object& partition_id, const py::object& keys,
             const py::object& partials) {
            const std::uint32_t pid = partition_arg(partition_id, self.num_partitions());
            const PinnedByteStrings k(keys, ByteItems::kKeys, "keys");
            const PinnedByteStrings v(partials, ByteItems::kBuffers, "partials");
            // Every key and partial is pinned above; the map work needs no Python state.
            const py::gil_scoped_release release;
            self.publish_many(pid, k.views(), v.views());
          },
          py::arg("partition_id"), py::arg("keys"), py::arg("partials"),
          "Publish ``partials[i]`` under ``keys[i]`` for one partition in one call, with the GIL\n"
          "released; the last of repeated keys wins. All or nothing: a bad item publishes none.")
      .def(
          "get_partial",
          [](const AggregateStore& self, const py::object& group_key,
             const py::object& partition_id) -> py::object {
            const KeyBytes key(group_key, ByteItems::kKeys, "group_key");
            const std::uint32_t pid = partition_arg(partition_id, self.num_partitions());
            std::optional<std::string> partial = self.get_partial(key.view(), pid);
            if (!partial) return py::none();
            return py::bytes(*partial);
          },
          py::arg("group_key"), py::arg("partition_id"),
          "The partial ``partition_id`` published for ``group_key``, or None.")
      .def(
          "collect_partials",
          [](const AggregateStore& self, const py::object& group_key) {
            const KeyBytes key(group_key, ByteItems::kKeys, "group_key");
            std::vector<std::pair<std::uint32_t, std::string>> partials;
            {
              const py::gil_scoped_release release;  // the key is pinned above
              partials = self.collect_partials(key.view());
            }
            py::list out;
            for (auto& [pid, partial] : partials) out.append(py::make_tuple(pid, py::bytes(partial)));
            return out;
          },
          py::arg("group_key"),
          "``[(partition_id, partial), ...]`` for ``group_key``, by ascending partition id.")
      .def(
          "remove_group",
          [](AggregateStore& self, const py::object& group_key) {
            const KeyBytes key(group_key, ByteItems::kKeys, "group_key");
            return self.remove_group(key.view());
          },
          py::arg("group_key"),
          "Drop every partition's partial for ``group_key``; returns how many were dropped.")
      .def(
          "groups",
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
          },
          "Every group key held, sorted.")
      .def(
          "snapshot",
          [](AggregateStore& self) {
            std::string snap;
            {
              const py::gil_scoped_release release;  // pure C++ under the store's lock
              snap = self.snapshot();
            }
            return bytes_recycling(std::move(snap));
          },
          "Every partial as checksummed record-codec bytes; consistent while others publish\n"
          "(each publish_many call is in it entirely or not at all). Resets the change\n"
          "tracking of snapshot_delta().")
      .def(
          "snapshot_delta",
          [](AggregateStore& self) {
            std::string delta;
            {
              const py::gil_scoped_release release;  // pure C++ under the store's lock
              delta = self.snapshot_delta();
            }
            return bytes_recycling(std::move(delta));
          },
          "Only the entries published or removed since the previous snapshot() or\n"
          "snapshot_delta(), as checksummed bytes naming their parent; resets the change\n"
          "tracking. Consistent while others publish.")
      .def(
          "apply_delta",
          [](AggregateStore& self, const py::object& data) {
            require_buffer(data, "data");
            const ImmutableInput input(data);
            const py::gil_scoped_release release;  // decodes memory no other thread can change
            self.apply_delta(input.view());
          },
          py::arg("data"),
          "Apply a snapshot_delta() taken from this store's current state. Corrupt bytes or\n"
          "a delta of another parent raise CorruptDataError and leave the store as it was.")
      .def(
          "restore",
          [](AggregateStore& self, const py::object& data) {
            require_buffer(data, "data");
            const ImmutableInput input(data);
            const py::gil_scoped_release release;  // decodes memory no other thread can change
            self.restore(input.view());
          },
          py::arg("data"),
          "Replace all state with a snapshot's. Corrupt or foreign bytes raise\n"
          "CorruptDataError and leave the store as it was.")
      .def(
          "memory_bytes",
          [](const AggregateStore& self) {
            const py::gil_scoped_release release;
            return self.memory_bytes();
          },
          "Approximate heap bytes held by the store.");
}

void register_numeric_store(py::module_& m) {
  py::class_<PartitionHandle>(m, "PartitionAggregator", R"doc(
A partition's single-writer local fold; get one from NumericAggregateStore.partition().

fold(keys, values) folds a batch with the GIL released; publish() pushes the partials changed
since the last publish. As a context manager it publishes on a clean exit.
)doc")
      .def_property_readonly(
          "partition_id", [](const PartitionHandle& self) { return self.partition_id; },
          "The partition this aggregator folds for.")
      .def(
          "fold",
          [](const PartitionHandle& self, const py::object& keys, const py::object& values) {
            fold_into(*self.store, self.partition_id, keys, values);
          },
          py::arg("keys"), py::arg("values"),
          "Fold a batch: ``keys`` an integer array-like (key_type='int64'), or for key_type='bytes'\n"
          "a numpy 'S'/'U' array (trailing NULs are padding), a pyarrow string/binary array\n"
          "(anything with __arrow_c_array__) or a sequence of bytes / str; ``values`` a float64\n"
          "array-like of the same length. Bad input raises before any row is folded; a null key\n"
          "raises ValueError. Interruptible: Ctrl-C stops it between chunks of ~512K rows,\n"
          "and the chunks folded before then stay folded.")
      .def(
          "publish",
          [](const PartitionHandle& self) {
            const py::gil_scoped_release release;  // only C++ state is touched
            return self.store->visit([&](auto& s) { return s.publish(self.partition_id); });
          },
          "Push the partials changed since the last publish to the shared map; returns how\n"
          "many were pushed.")
      .def(
          "__len__",
          [](const PartitionHandle& self) {
            return self.store->visit(
                [&](const auto& s) { return s.partition_size(self.partition_id); });
          },
          "Keys held locally by this partition.")
      .def_property_readonly(
          "pending",
          [](const PartitionHandle& self) {
            return self.store->visit(
                [&](const auto& s) { return s.partition_pending(self.partition_id); });
          },
          "Keys changed since the last publish.")
      .def(
          "memory_bytes",
          [](const PartitionHandle& self) {
            return self.store->visit(
                [&](const auto& s) { return s.partition_memory_bytes(self.partition_id); });
          },
          "Approximate heap bytes of this partition's local table.")
      .def(
          "__enter__",
          [](const py::object& self) {
            (void)self.cast<const PartitionHandle&>();  // refuses an uninitialised instance
            return self;
          },
          "Returns the aggregator.")
      .def(
          "__exit__",
          [](const PartitionHandle& self, const py::object& exc_type, const py::object& /*exc*/,
             const py::object& /*tb*/) {
            if (exc_type.is_none()) {
              const py::gil_scoped_release release;  // only C++ state
              self.store->visit([&](auto& s) { return s.publish(self.partition_id); });
            }
            return false;
          },
          py::arg("exc_type"), py::arg("exc"), py::arg("tb"),
          "Publish on a clean exit; an exception leaves the local state unpublished.")
      .def("__repr__", [](const PartitionHandle& self) {
        const auto [size, pending] = self.store->visit([&](const auto& s) {
          return std::pair{s.partition_size(self.partition_id),
                           s.partition_pending(self.partition_id)};
        });
        return "PartitionAggregator(partition_id=" + std::to_string(self.partition_id) +
               ", keys=" + std::to_string(size) + ", pending=" + std::to_string(pending) + ")";
      });

  py::class_<NumericStoreHandle, std::shared_ptr<NumericStoreHandle>>(m, "NumericAggregateStore",
                                                                       R"doc(
count/sum/min/max/mean/var per key, folded per partition and merged across them.

NumericAggregateStore(num_partitions, key_type="int64", nan_policy="skip").
)doc")
      .def(py::init([](const py::object& num_partitions, const py::object& key_type,
                       const py::object& nan_policy) {
             const std::uint32_t np = num_partitions_arg(num_partitions);
             const KeyType type = key_type_arg(key_type);
             const NanPolicy policy = nan_policy_arg(nan_policy);
             return std::make_shared<NumericStoreHandle>(type, np, policy);
           }),
           py::arg("num_partitions"), py::arg("key_type") = "int64",
           py::arg("nan_policy") = "skip",
           "``num_partitions`` 1 to 65536; ``key_type`` 'int64' or 'bytes'; ``nan_policy``\n"
           "'skip', 'propagate' or 'raise'.")
      .def_property_readonly(
          "num_partitions",
          [](const NumericStoreHandle& self) {
            return self.visit([](const auto& s) { return s.num_partitions(); });
          },
          "How many partitions fold into the store.")
      .def_property_readonly(
          "key_type",
          [](const NumericStoreHandle& self) { return std::string(key_type_name(self.key_type())); },
          "'int64' or 'bytes'.")
      .def_property_readonly(
          "nan_policy",
          [](const NumericStoreHandle& self) {
            return std::string(
                nan_policy_name(self.visit([](const auto& s) { return s.nan_policy(); })));
          },
          "'skip', 'propagate' or 'raise'.")
      .def(
          "partition",
          [](const py::object& self, const py::object& partition_id) {
            // Loaded as a reference first: that refuses an uninitialised instance with a
            // TypeError, where loading its (absent) holder would raise a RuntimeError.
            const auto& store = self.cast<const NumericStoreHandle&>();
            const std::uint32_t n = store.visit([](const auto& s) { return s.num_partitions(); });
            return PartitionHandle{self.cast<std::shared_ptr<NumericStoreHandle>>(),
                                   partition_arg(partition_id, n)};
          },
          py::arg("partition_id"),
          "The single-writer PartitionAggregator of ``partition_id`` (one writer thread each).")
      .def(
          "__len__",
          [](const NumericStoreHandle& self) {
            return self.visit([](const auto& s) { return s.size(); });
          },
          "Keys with a published partial.")
      .def("_result_tuple", &result_tuple, py::arg("key"),
           "(count, sum, min, max, mean, var, std) of ``key`` merged across partitions, or None.")
      .def(
          "results",
          [](const NumericStoreHandle& self) { return results_columns(self, KeyFormat::kBytes); },
          "Every published key's statistics as columns: {'key', 'count', 'sum', 'min', 'max',\n"
          "'mean', 'var', 'std'} (keys an int64 array or a list of bytes; count int64).")
      .def(
          "_columns",
          [](const NumericStoreHandle& self, const py::object& key_format) {
            return results_columns(self, key_format_arg(key_format));
          },
          py::arg("key_format"),
          "results() with byte-string keys as 'bytes' or 'str' (lists) or 'arrow' (an\n"
          "(offsets, data) pair of arrays in Arrow's binary layout); int64 keys are an array.")
      .def(
          "snapshot",
          [](const NumericStoreHandle& self) {
            std::string snap;
            {
              const py::gil_scoped_release release;  // pure C++ under the store's locks
              snap = self.visit([](auto& s) { return s.snapshot(); });
            }
            return bytes_recycling(std::move(snap));
          },
          "The shared map and every partition's local state as checksummed bytes; resets\n"
          "the change tracking of snapshot_delta().")
      .def(
          "snapshot_delta",
          [](const NumericStoreHandle& self) {
            std::string delta;
            {
              const py::gil_scoped_release release;  // pure C++ under the store's locks
              delta = self.visit([](auto& s) { return s.snapshot_delta(); });
            }
            return bytes_recycling(std::move(delta));
          },
          "Only the published slots and local entries created or changed since the previous\n"
          "snapshot() or snapshot_delta(), as checksummed bytes naming their parent; resets\n"
          "the change tracking. Consistent while others publish.")
      .def(
          "snapshot_into",
          [](const NumericStoreHandle& self, const py::object& out, bool delta) {
            if (!PyByteArray_Check(out.ptr())) {
              throw py::type_error("snapshot_into: out must be a bytearray, got " +
                                   type_name(out));
            }
            // A bytearray someone holds a view of cannot be resized (BufferError): found out
            // here, before the capture resets the change tracking, by a resize to one more
            // byte and back (within the allocation, so nothing moves).
            const Py_ssize_t size = PyByteArray_GET_SIZE(out.ptr());
            if (PyByteArray_Resize(out.ptr(), size + 1) != 0 ||
                PyByteArray_Resize(out.ptr(), size) != 0) {
              throw py::error_already_set();
            }
            std::string capture;
            {
              const py::gil_scoped_release release;  // pure C++ under the store's locks
              capture = self.visit([delta](auto& s) {
                return delta ? s.snapshot_delta() : s.snapshot();
              });
            }
            // Only a view taken by another thread during the capture makes this fail; the
            // capture is then lost with the change tracking it reset, as when snapshot()
            // cannot allocate its bytes.
            if (PyByteArray_Resize(out.ptr(), static_cast<Py_ssize_t>(capture.size())) != 0) {
              throw py::error_already_set();
            }
            // With the GIL held: another thread could otherwise resize `out` under the copy.
            std::memcpy(PyByteArray_AS_STRING(out.ptr()), capture.data(), capture.size());
            recycle_record_buffer(std::move(capture));
          },
          py::arg("out"), py::kw_only(), py::arg("delta") = false,
          "snapshot() (or, with delta=True, snapshot_delta()) written into the bytearray out,\n"
          "resized to the capture's length, instead of into a new bytes object: a caller that\n"
          "captures periodically reuses one buffer whose pages are mapped already, where a\n"
          "new object of tens of MB faults in every page afresh.")
      .def(
          "apply_delta",
          [](const NumericStoreHandle& self, const py::object& data) {
            require_buffer(data, "data");
            const ImmutableInput input(data);
            const py::gil_scoped_release release;  // decodes memory no other thread can change
            self.visit([&](auto& s) { s.apply_delta(input.view()); });
          },
          py::arg("data"),
          "Apply a snapshot_delta() taken from this store's current state (restored from the\n"
          "delta's parent). Corrupt bytes or a delta of another parent raise\n"
          "CorruptDataError and leave the store as it was.")
      .def(
          "restore",
          [](const NumericStoreHandle& self, const py::object& data) {
            require_buffer(data, "data");
            const ImmutableInput input(data);
            const py::gil_scoped_release release;  // decodes memory no other thread can change
            self.visit([&](auto& s) { s.restore(input.view()); });
          },
          py::arg("data"),
          "Replace all state (shared and every partition's) with a snapshot's. Corrupt or\n"
          "foreign bytes raise CorruptDataError and leave the store as it was.")
      .def(
          "memory_bytes",
          [](const NumericStoreHandle& self) {
            const py::gil_scoped_release release;
            return self.visit([](const auto& s) { return s.memory_bytes(); });
          },
          "Approximate heap bytes of the shared map and every partition's table.");

  // Partial-level helpers (encoded Moments) used by the merge-law property tests.
  m.def(
      "_moments_of",
      [](const py::object& values) {
        const Float64Array vals = float_values(values);
        Moments acc;
        for (py::ssize_t i = 0; i < vals.size(); ++i) acc.add(vals.data()[i]);
        return py::bytes(moments_bytes(acc));
      },
      py::arg("values"), "The encoded partial of ``values`` (for property tests).");
  m.def(
      "_moments_merge",
      [](const py::object& a, const py::object& b) {
        Moments acc = moments_from(a, "a");
        acc.merge(moments_from(b, "b"));
        return py::bytes(moments_bytes(acc));
      },
      py::arg("a"), py::arg("b"), "The encoded merge of two encoded partials.");
  m.def(
      "_moments_stats",
      [](const py::object& partial) { return stats_tuple(moments_from(partial, "partial")); },
      py::arg("partial"), "(count, sum, min, max, mean, var, std) of an encoded partial.");
}

}  // namespace

void register_aggregate_store(py::module_& m) {
  register_opaque_store(m);
  register_numeric_store(m);
}

}  // namespace streamstate::bindings
