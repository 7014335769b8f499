#include "bindings/arguments.h"
#include "bindings/buffers.h"
#include "bindings/prelude.h"
#include "core/checkpoint_batch.h"
#include "core/errors.h"

#include <deque>
#include <optional>
#include <string>
#include <vector>

namespace streamstate::bindings {
namespace {

// The UTF-8 bytes of a str, cached inside the str object itself (no copy); valid while the
// str lives. Lone surrogates cannot be encoded and raise UnicodeEncodeError.
std::string_view utf8_of(py::handle text) {
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(text.ptr(), &size);
  if (data == nullptr) throw py::error_already_set();
  return {data, static_cast<std::size_t>(size)};
}

// A non-negative int bound, or None for "no bound but the format's own".
std::size_t size_limit_of(const py::object& value, const char* what) {
  if (value.is_none()) return kBatchMaxBody;
  if (PyBool_Check(value.ptr()) || !PyLong_Check(value.ptr())) {
    throw py::type_error(std::string(what) + " must be an int or None, got " +
                         Py_TYPE(value.ptr())->tp_name);
  }
  int overflow = 0;
  const long long limit = PyLong_AsLongLongAndOverflow(value.ptr(), &overflow);
  if (overflow > 0) return kBatchMaxBody;  // beyond any body the format can hold
  if (overflow < 0 || limit < 0) throw py::value_error(std::string(what) + " must be >= 0");
  return static_cast<std::size_t>(limit);
}

// "lz4", "stored" or "auto" (see BatchCompression).
BatchCompression compression_of(const py::object& value) {
  if (!PyUnicode_Check(value.ptr())) {
    throw py::type_error(std::string("encode_batch: compression must be a str, got ") +
                         Py_TYPE(value.ptr())->tp_name);
  }
  const std::string_view name = utf8_of(value);
  if (name == "lz4") return BatchCompression::kLz4;
  if (name == "stored") return BatchCompression::kStored;
  if (name == "auto") return BatchCompression::kAuto;
  throw py::value_error("encode_batch: compression must be 'lz4', 'stored' or 'auto', got '" +
                        std::string(name) + "'");
}

// The entries of one encode, pinned (needs the GIL): the strong references keep every key
// and buffer alive even if the caller's list is mutated while the GIL is released.
struct PinnedEntries {
  std::vector<py::object> owners;
  std::deque<BufferView> pins;  // a deque never moves its elements
  std::vector<BatchEntryView> views;
};

void pin_entries(const py::object& entries_arg, PinnedEntries& pinned) {
  const py::iterable entries = iterable_arg(entries_arg, "entries");
  if (py::isinstance<py::sequence>(entries)) {
    const auto n = static_cast<std::size_t>(py::len(entries));
    pinned.owners.reserve(2 * n);
    pinned.views.reserve(n);
  }
  for (const py::handle item : entries) {
    py::object key;
    py::object data;
    if (PyTuple_Check(item.ptr()) && PyTuple_GET_SIZE(item.ptr()) == 2) {
      key = py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(item.ptr(), 0));
      data = py::reinterpret_borrow<py::object>(PyTuple_GET_ITEM(item.ptr(), 1));
    } else if (py::isinstance<py::sequence>(item) && !py::isinstance<py::str>(item) &&
               py::len(item) == 2) {
      const auto pair = py::reinterpret_borrow<py::sequence>(item);
      key = pair[0];
      data = pair[1];
    } else {
      throw py::type_error("encode_batch: each entry must be a (key, data) pair");
    }
    if (!PyUnicode_Check(key.ptr())) {
      throw py::type_error("encode_batch: keys must be str, got " +
                           std::string(Py_TYPE(key.ptr())->tp_name));
    }
    BatchEntryView view;
    view.key = utf8_of(key);
    if (PyBytes_CheckExact(data.ptr())) {
      // bytes are immutable, so the reference alone pins them.
      view.data = {PyBytes_AS_STRING(data.ptr()),
                   static_cast<std::size_t>(PyBytes_GET_SIZE(data.ptr()))};
    } else {
      view.data = pinned.pins.emplace_back(data).view();
    }
    pinned.owners.push_back(std::move(key));
    pinned.owners.push_back(std::move(data));
    pinned.views.push_back(view);
  }
}

py::bytes encode_batch_py(const py::object& entries_arg, const py::object& compression_arg) {
  const BatchCompression compression = compression_of(compression_arg);
  PinnedEntries pinned;
  pin_entries(entries_arg, pinned);
  const std::vector<BatchEntryView>& views = pinned.views;
  const std::size_t body_size = batch_body_size(views);
  // The fill runs without the GIL: it reads only the pinned buffers above and writes only the
  // new bytes object, which no other thread can see yet.
  return bytes_filled_by(batch_encoded_bound(body_size), body_size,
                         [&views, body_size, compression](char* dst, std::size_t capacity) {
                           return encode_batch_into(views, body_size, dst, capacity,
                                                    compression);
                         });
}

void encode_batch_into_py(const py::object& entries_arg, const py::object& out,
                          const py::object& compression_arg) {
  const BatchCompression compression = compression_of(compression_arg);
  if (!PyByteArray_Check(out.ptr())) {
    throw py::type_error("encode_batch_into: out must be a bytearray, got " + type_name(out));
  }
  PinnedEntries pinned;
  pin_entries(entries_arg, pinned);
  const std::size_t body_size = batch_body_size(pinned.views);
  const std::size_t bound = batch_encoded_bound(body_size);
  // Fails with BufferError while someone holds a view of `out` (or `out` is an entry).
  if (PyByteArray_Resize(out.ptr(), static_cast<Py_ssize_t>(bound)) != 0) {
    throw py::error_already_set();
  }
  std::size_t used = 0;
  try {
    const BufferView pin(out);  // nobody can resize `out` while the GIL is released
    const MaybeReleaseGil release(body_size);
    used = encode_batch_into(pinned.views, body_size, PyByteArray_AS_STRING(out.ptr()), bound,
                             compression);
  } catch (...) {
    if (PyByteArray_Resize(out.ptr(), 0) != 0) PyErr_Clear();  // no half-written batch
    throw;
  }
  if (PyByteArray_Resize(out.ptr(), static_cast<Py_ssize_t>(used)) != 0) {  // shrinks in place
    throw py::error_already_set();
  }
}

// What compression="auto" picks for `entries`: "lz4" or "stored" (choose_batch_compression).
py::str batch_compression_py(const py::object& entries_arg) {
  PinnedEntries pinned;
  pin_entries(entries_arg, pinned);
  const std::size_t body_size = batch_body_size(pinned.views);
  BatchCompression chosen = BatchCompression::kLz4;
  {
    // Renders and compresses at most one 64 KiB sample of the pinned buffers.
    const MaybeReleaseGil release(body_size);
    chosen = choose_batch_compression(pinned.views, body_size);
  }
  return py::str(chosen == BatchCompression::kStored ? "stored" : "lz4");
}

py::list decode_batch_py(const py::object& raw, const py::object& max_size) {
  const std::size_t max_body_size = size_limit_of(max_size, "decode_batch: max_size");
  // Decoded without the GIL: a copy (or immutable bytes) no other thread can change.
  const ImmutableInput buffer(raw);
  std::optional<DecodedBatch> batch;
  {
    // Pure C++ over the pinned input buffer: validation, CRC and decompression.
    const MaybeReleaseGil release(buffer.size());
    batch.emplace(decode_batch(buffer.view(), max_body_size));
  }
  const std::vector<BatchEntryView>& entries = batch->entries();
  py::list out(static_cast<py::ssize_t>(entries.size()));
  std::vector<char*> destinations(entries.size());
  for (std::size_t i = 0; i < entries.size(); ++i) {
    const BatchEntryView& entry = entries[i];
    // The core validated the key as UTF-8, so this cannot fail short of memory.
    auto key = py::reinterpret_steal<py::object>(PyUnicode_DecodeUTF8(
        entry.key.data(), static_cast<Py_ssize_t>(entry.key.size()), "strict"));
    if (!key) throw py::error_already_set();
    auto data = py::reinterpret_steal<py::object>(
        PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(entry.data.size())));
    if (!data) throw py::error_already_set();
    destinations[i] = PyBytes_AS_STRING(data.ptr());
    PyObject* pair = PyTuple_New(2);
    if (pair == nullptr) throw py::error_already_set();
    PyTuple_SET_ITEM(pair, 0, key.release().ptr());
    PyTuple_SET_ITEM(pair, 1, data.release().ptr());
    PyList_SET_ITEM(out.ptr(), static_cast<Py_ssize_t>(i), pair);
  }
  {
    // Fills the bytes objects just created; nothing else holds them yet, and the copy never
    // touches a reference count.
    const MaybeReleaseGil release(batch->body_size());
    batch->copy_data_to(destinations);
  }
  return out;
}

}  // namespace

void register_checkpoint_batch(py::module_& m) {
  m.def("encode_batch", &encode_batch_py, py::arg("entries"), py::kw_only(),
        py::arg("compression") = py::str("lz4"),
        "Encode (key: str, data: bytes-like) pairs as one LCB1 version-2 batch "
        "(CRC32C-checked). compression: 'lz4' compresses the body, 'stored' writes it as "
        "LZ4 literals (no match search; any LZ4 reader decodes it), 'auto' stores a large "
        "body unless LZ4 halves a sample of it.");
  m.def("encode_batch_into", &encode_batch_into_py, py::arg("entries"), py::arg("out"),
        py::kw_only(), py::arg("compression") = py::str("lz4"),
        "encode_batch() written into the bytearray out (resized to the batch's length) "
        "instead of a new bytes object: a caller encoding periodically reuses one buffer "
        "whose pages are mapped already. BufferError while someone holds a view of out.");
  m.def("batch_compression", &batch_compression_py, py::arg("entries"),
        "What encode_batch(entries, compression='auto') would use: 'lz4' or 'stored' (a body "
        "of 1 MiB or more is stored unless LZ4 halves a 64 KiB sample of it).");
  m.def("decode_batch", &decode_batch_py, py::arg("raw"),
        py::arg("max_size") = py::int_(kDefaultMaxDecompressedSize),
        "Validate and decode an LCB1 batch (version 1 or 2) into [(key, data), ...]; a body "
        "over max_size bytes (None: no bound but the format's) is refused before allocating.");
}

}  // namespace streamstate::bindings
