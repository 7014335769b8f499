#include "bindings/arguments.h"
#include "bindings/arrays.h"
#include "bindings/buffers.h"
#include "bindings/key_columns.h"
#include "bindings/key_dispatch.h"
#include "bindings/prelude.h"
#include "bindings/result_arrays.h"
#include "bindings/routed_slice.h"
#include "bindings/value_block.h"
#include "core/aggregate_store.h"
#include "core/byte_io.h"
#include "core/errors.h"
#include "core/numeric_aggregate_store.h"
#include "core/stats.h"

#include <algorithm>
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

// A list or tuple of partition ids of a store of `num_partitions` (snapshot(partitions=),
// restore_from(partitions=)).
std::vector<std::uint32_t> partition_list_arg(py::handle partitions, std::uint32_t num_partitions) {
  if (PyList_Check(partitions.ptr()) == 0 && PyTuple_Check(partitions.ptr()) == 0 &&
      PyObject_TypeCheck(partitions.ptr(), &PyRange_Type) == 0) {
    throw py::type_error("partitions must be a list, tuple or range of partition ids, not " +
                         type_name(partitions));
  }
  std::vector<std::uint32_t> out;
  for (const py::handle pid : partitions) out.push_back(partition_arg(pid, num_partitions));
  return out;
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
  const std::size_t width = handle.visit([](const auto& s) { return s.width(); });
  const ValueBlock block(values, handle.visit([](const auto& s) -> const std::vector<std::string>& {
    return s.columns();
  }), width);
  const std::size_t n = block.rows();
  const double* v = block.data();
  const NanPolicy policy = handle.visit([](const auto& s) { return s.nan_policy(); });
  const std::size_t chunk =
      policy == NanPolicy::kRaise && any_nan(v, n * width) ? n + 1 : kInterruptRows;
  if (handle.is_bytes()) {
    const ByteKeyColumn column(keys, "keys");
    check_lengths(column.size(), n);
    std::vector<std::string_view> scratch;
    // Only the column's pinned buffers and C++ state are touched while released.
    run_interruptible(n, 8 + 8 * width + column.total_bytes() / (n == 0 ? 1 : n), chunk,
                      [&](std::size_t begin, std::size_t end) {
                        const std::string_view* views = column.chunk_views(begin, end, scratch);
                        handle.bytes().fold(pid, views, v + begin * width, end - begin);
                      });
  } else {
    const Int64Array ks = int_keys(keys);
    check_lengths(static_cast<std::size_t>(ks.size()), n);
    const std::int64_t* k = ks.data();
    // Only the arrays (kept alive by this frame) and C++ state are touched while released.
    run_interruptible(n, 8 + 8 * width, chunk, [&](std::size_t begin, std::size_t end) {
      handle.int64().fold(pid, k + begin, v + begin * width, end - begin);
    });
  }
}

// Folds a routed slice, reusing the hashes routing computed; chunked and all-or-nothing
// under nan_policy='raise' as fold_into is.
void fold_slice_into(const NumericStoreHandle& handle, std::uint32_t pid, py::handle slice_arg) {
  if (!py::isinstance<RoutedSlice>(slice_arg)) {
    throw py::type_error("slice must be a RoutedSlice (from partition_batch(..., as_slices=True)), "
                         "not " + type_name(slice_arg));
  }
  const auto& slice = slice_arg.cast<const RoutedSlice&>();
  const std::size_t width = handle.visit([](const auto& s) { return s.width(); });
  if (slice.is_bytes() != handle.is_bytes()) {
    throw py::type_error(std::string("the slice holds ") + (slice.is_bytes() ? "bytes" : "int64") +
                         " keys, the store's key_type is " +
                         (handle.is_bytes() ? "'bytes'" : "'int64'"));
  }
  if (slice.width() != width) {
    throw InvalidArgument("the slice carries " + std::to_string(slice.width()) +
                          " value columns, the store folds " + std::to_string(width));
  }
  const auto fold = [&](auto& store, const auto& rows) {
    const std::size_t n = rows.size();
    const double* v = rows.values.data();
    const std::size_t chunk =
        store.nan_policy() == NanPolicy::kRaise && any_nan(v, n * width) ? n + 1 : kInterruptRows;
    // The slice is immutable and kept alive by the caller's reference: safe without the GIL.
    run_interruptible(n, 16 + 8 * width, chunk, [&](std::size_t begin, std::size_t end) {
      store.fold(pid, rows.keys.data() + begin, v + begin * width, end - begin,
                 rows.hashes.data() + begin);
    });
  };
  if (handle.is_bytes()) {
    fold(handle.bytes(), std::get<RoutedRows<BytesKeys>>(slice.rows));
  } else {
    fold(handle.int64(), std::get<RoutedRows<Int64Keys>>(slice.rows));
  }
}

// The key's statistics of value column `column`, or None (no such key, or none of its
// values of that column counted).
// The partitions holding a partial of `key` (see NumericAggregateStore::partitions_holding).
py::list partitions_holding(const NumericStoreHandle& handle, py::handle key) {
  std::vector<std::uint32_t> held;
  if (handle.is_bytes()) {
    const KeyBytes k(key, ByteItems::kKeysOrText, "key");
    held = handle.bytes().partitions_holding(k.view());
  } else if (const std::optional<std::int64_t> k = int64_key(key)) {
    held = handle.int64().partitions_holding(*k);
  }  // outside int64: no partition can hold such a key
  py::list out;
  for (const std::uint32_t p : held) out.append(p);
  return out;
}

py::object result_tuple(const NumericStoreHandle& handle, py::handle key, py::handle column) {
  const std::size_t width = handle.visit([](const auto& s) { return s.width(); });
  const auto c = int_arg<std::size_t>(column, "column", 0, width - 1);
  std::optional<Moments> m;
  if (handle.is_bytes()) {
    const KeyBytes k(key, ByteItems::kKeysOrText, "key");
    m = handle.bytes().result(k.view(), c);
  } else {
    const std::optional<std::int64_t> k = int64_key(key);
    if (!k) return py::none();  // outside int64: no such key can exist
    m = handle.int64().result(*k, c);
  }
  if (!m || m->count == 0) return py::none();
  return stats_tuple(*m);
}

// The {"key", "count", "sum", "min", "max", "mean", "var", "std"} dict (the shape
// streamstate.stats.STAT_COLUMNS describes), built from columns the core already finished,
// without copying them.
py::dict adopt_columns(py::object keys, StatArrays&& c) {
  const std::size_t n = c.size;
  py::dict out;
  if (!keys.is_none()) out["key"] = std::move(keys);
  out["count"] = adopt(std::move(c.count), n);
  out["sum"] = adopt(std::move(c.sum), n);
  out["min"] = adopt(std::move(c.min), n);
  out["max"] = adopt(std::move(c.max), n);
  out["mean"] = adopt(std::move(c.mean), n);
  out["var"] = adopt(std::move(c.var), n);
  out["std"] = adopt(std::move(c.std), n);
  return out;
}

// One column: the flat {"key", "count", ...} dict. Several: {"key": keys, "values":
// [{"count", ...} per value column, in order]}, every value column over the same keys.
py::dict results_columns(const NumericStoreHandle& handle, KeyFormat format) {
  const std::size_t width = handle.visit([](const auto& s) { return s.width(); });
  std::vector<StatArrays> columns(width);
  py::object key_column;
  if (handle.is_bytes()) {
    BytesKeys::KeyColumn keys;
    {
      // Copies out under the store's lock; Python objects are built after it is released.
      const py::gil_scoped_release release;
      handle.bytes().result_columns(keys, columns.data());
    }
    key_column = bytes_key_column(std::move(keys), format);
  } else {
    Int64Keys::KeyColumn keys;
    {
      const py::gil_scoped_release release;  // pure C++ copy-out under the store's lock
      handle.int64().result_columns(keys, columns.data());
    }
    key_column = adopt_container<std::int64_t>(std::move(keys.keys));
  }
  if (width == 1) return adopt_columns(std::move(key_column), std::move(columns[0]));
  py::list values;
  for (StatArrays& c : columns) values.append(adopt_columns(py::none(), std::move(c)));
  py::dict out;
  out["key"] = std::move(key_column);
  out["values"] = std::move(values);
  return out;
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
          "fold_slice",
          [](const PartitionHandle& self, const py::object& slice) {
            fold_slice_into(*self.store, self.partition_id, slice);
          },
          py::arg("slice"),
          "Fold a RoutedSlice (partition_batch(..., as_slices=True)): the same as\n"
          "fold(slice.keys, slice.values), without hashing the keys again (routing's hashes\n"
          "are reused) or converting them. TypeError for a slice of the other key type,\n"
          "ValueError for one of another width; interruptible as fold is.")
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
                       const py::object& nan_policy, const py::object& values,
                       const py::object& key_groups) {
             const std::uint32_t np = num_partitions_arg(num_partitions);
             const KeyType type = key_type_arg(key_type);
             const NanPolicy policy = nan_policy_arg(nan_policy);
             const auto groups = int_arg<std::uint32_t>(key_groups, "key_groups", 1, kMaxKeyGroups);
             return std::make_shared<NumericStoreHandle>(type, np, policy,
                                                         value_names_arg(values), groups);
           }),
           py::arg("num_partitions"), py::arg("key_type") = "int64",
           py::arg("nan_policy") = "skip", py::arg("values") = py::none(),
           py::arg("key_groups") = kDefaultKeyGroups,
           "``num_partitions`` 1 to ``key_groups``; ``key_type`` 'int64' or 'bytes';\n"
           "``nan_policy`` 'skip', 'propagate' or 'raise'; ``values`` None (one unnamed value\n"
           "column) or the value columns' names; ``key_groups`` 1 to 65536 (default 256),\n"
           "fixed for the life of a job.")
      .def_property_readonly(
          "key_groups",
          [](const NumericStoreHandle& self) {
            return self.visit([](const auto& s) { return s.key_groups(); });
          },
          "How many key groups keys hash to (recorded in snapshots); partition p owns the\n"
          "contiguous groups key_group_range(p, num_partitions, key_groups).")
      .def_property_readonly(
          "values",
          [](const NumericStoreHandle& self) -> py::object {
            const auto& names =
                self.visit([](const auto& s) -> const std::vector<std::string>& { return s.columns(); });
            if (names.empty()) return py::none();
            py::list out;
            for (const std::string& name : names) out.append(py::str(name));
            return out;
          },
          "The value columns' names, or None for the one unnamed column.")
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
      .def("_result_tuple", &result_tuple, py::arg("key"), py::arg("column") = 0,
           "(count, sum, min, max, mean, var, std) of ``key``'s value column ``column`` (an\n"
           "index) merged across partitions, or None.")
      .def(
          "results",
          [](const NumericStoreHandle& self) { return results_columns(self, KeyFormat::kBytes); },
          "Every published key's statistics as columns: {'key', 'count', 'sum', 'min', 'max',\n"
          "'mean', 'var', 'std'} (keys an int64 array or a list of bytes; count int64); with\n"
          "several value columns {'key', 'values': [one such dict without 'key' per column]}.")
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
          [](const NumericStoreHandle& self, const py::object& partitions) {
            std::optional<std::vector<std::uint32_t>> listed;
            if (!partitions.is_none()) {
              listed = partition_list_arg(
                  partitions, self.visit([](const auto& s) { return s.num_partitions(); }));
            }
            std::string snap;
            {
              const py::gil_scoped_release release;  // pure C++ under the store's locks
              snap = self.visit([&listed](auto& s) {
                return listed ? s.snapshot_partitions(*listed) : s.snapshot();
              });
            }
            return bytes_recycling(std::move(snap));
          },
          py::arg("partitions") = py::none(),
          "The shared map and every partition's local state as checksummed bytes, sectioned\n"
          "by key group; resets the change tracking of snapshot_delta(). With ``partitions``\n"
          "(ids of this store): an export of only the keys those partitions hold, one merged\n"
          "partial (published and local) per key, sectioned by key group, for\n"
          "restore_from(); the change tracking is left alone.")
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
            capture_into(out, [&] {
              return self.visit([delta](auto& s) { return delta ? s.snapshot_delta() : s.snapshot(); });
            });
          },
          py::arg("out"), py::kw_only(), py::arg("delta") = false,
          "snapshot() (or, with delta=True, snapshot_delta()) written into the bytearray out,\n"
          "resized to the capture's length, instead of into a new bytes object: a caller that\n"
          "captures periodically reuses one buffer whose pages are mapped already, where a\n"
          "new object of tens of MB faults in every page afresh.")
      .def(
          "capture",
          [](const NumericStoreHandle& self, const py::object& delta_arg) {
            if (!PyBool_Check(delta_arg.ptr())) {
              throw py::type_error("capture: delta must be a bool, not " + type_name(delta_arg));
            }
            const bool delta = delta_arg.ptr() == Py_True;
            return capture_buffer([&] {
              return self.visit([delta](auto& s) { return delta ? s.snapshot_delta() : s.snapshot(); });
            });
          },
          py::kw_only(), py::arg("delta") = false,
          "snapshot() (or, with delta=True, snapshot_delta()) as a RecordBuffer: the bytes\n"
          "stay where the capture wrote them (no copy into a Python object), and their memory\n"
          "is reused by the next capture once the buffer is dropped.")
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
          "restore_from",
          [](const NumericStoreHandle& self, const py::object& artifacts,
             const py::object& partitions) {
            if (PyList_Check(artifacts.ptr()) == 0 && PyTuple_Check(artifacts.ptr()) == 0) {
              throw py::type_error("artifacts must be a list of bytes-like snapshots, not " +
                                   type_name(artifacts));
            }
            std::optional<std::vector<std::uint32_t>> listed;
            if (!partitions.is_none()) {
              listed = partition_list_arg(
                  partitions, self.visit([](const auto& s) { return s.num_partitions(); }));
            }
            std::vector<ImmutableInput> inputs;  // each keeps its bytes alive and unchanged
            inputs.reserve(static_cast<std::size_t>(py::len(artifacts)));
            std::vector<std::string_view> views;
            for (const py::handle artifact : artifacts) {
              require_buffer(artifact, "artifacts[i]");
              views.push_back(inputs.emplace_back(artifact).view());
            }
            const py::gil_scoped_release release;  // decodes memory no other thread can change
            self.visit([&](auto& s) { s.restore_from(views, listed); });
          },
          py::arg("artifacts"), py::arg("partitions") = py::none(),
          "Replace all state with the keys of ``artifacts`` (snapshot() or\n"
          "snapshot(partitions=...) bytes of stores of any partition count with this store's\n"
          "key type, value columns and key_groups) whose key group a listed partition of\n"
          "this store owns (None: all), each one published partial at its owner, merged\n"
          "across artifacts; reads only the sections of those groups. All or nothing:\n"
          "CorruptDataError (or ValueError for other key_groups) leaves the store as it was.")
      .def(
          "restore_columns",
          [](const NumericStoreHandle& self, const py::object& parts) {
            if (PyList_Check(parts.ptr()) == 0 && PyTuple_Check(parts.ptr()) == 0) {
              throw py::type_error("parts must be a list of bytes-like snapshots, not " +
                                   type_name(parts));
            }
            std::vector<ImmutableInput> inputs;  // each keeps its bytes alive and unchanged
            std::vector<std::string_view> views;
            for (const py::handle part : parts) {
              require_buffer(part, "parts[i]");
              views.push_back(inputs.emplace_back(part).view());
            }
            const py::gil_scoped_release release;  // decodes memory no other thread can change
            self.visit([&](auto& s) { s.restore_columns(views); });
          },
          py::arg("parts"),
          "Replace all state with one snapshot per value column (in order), each written by\n"
          "a store of one unnamed column (how pipelines checkpointed before one store held\n"
          "every column). Corrupt or foreign bytes raise CorruptDataError and leave the\n"
          "store as it was.")
      .def(
          "_repartition_into",
          [](const NumericStoreHandle& self, const NumericStoreHandle& target) {
            if (self.is_bytes() != target.is_bytes()) {
              throw InvalidArgument("repartition: the target store has another key_type");
            }
            const py::gil_scoped_release release;  // pure C++ under the stores' locks
            if (self.is_bytes()) {
              self.bytes().repartition_into(target.bytes());
            } else {
              self.int64().repartition_into(target.int64());
            }
          },
          py::arg("target"),
          "Fill ``target`` (an empty store of any partition count with this store's key type,\n"
          "nan_policy and value columns) with this store's state rescaled to its partitions\n"
          "(see NumericAggregateStore.repartitioned, which calls this).")
      .def("partitions_holding", &partitions_holding, py::arg("key"),
           "The partitions (ascending) holding a partial of ``key``: a published one or a\n"
           "local entry folded since the last publish. Empty for an unknown key.")
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
