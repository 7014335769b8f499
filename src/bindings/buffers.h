// Taking bytes from Python: every binding that reads a caller's buffer or a sequence of byte
// strings goes through one of these, so each rule (what counts as a byte string, when a
// buffer must be copied before the GIL is released) is written once.
#pragma once

#include "bindings/prelude.h"
#include "core/record_codec.h"

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace streamstate::bindings {

// A finished record container as bytes; its buffer then goes back for the next large
// container to be written into (see recycle_record_buffer).
inline py::bytes bytes_recycling(std::string&& container) {
  py::bytes out(container);
  recycle_record_buffer(std::move(container));
  return out;
}

// A finished record container handed to Python without a copy: read through the buffer
// protocol (memoryview, bytes(), hashlib, obstore.put, the checkpointer), read-only, its
// bytes owned here. When the last reference goes its buffer goes back for the next large
// container to be written into (see recycle_record_buffer), so a periodic capture neither
// copies tens of MB under the GIL nor faults in fresh pages.
class RecordBuffer {
 public:
  explicit RecordBuffer(std::string&& container) noexcept : bytes_(std::move(container)) {}
  RecordBuffer(const RecordBuffer&) = delete;
  RecordBuffer& operator=(const RecordBuffer&) = delete;
  RecordBuffer(RecordBuffer&&) = delete;
  RecordBuffer& operator=(RecordBuffer&&) = delete;
  ~RecordBuffer() { recycle_record_buffer(std::move(bytes_)); }

  [[nodiscard]] std::string_view view() const noexcept { return bytes_; }

 private:
  std::string bytes_;
};

// A store capture (`capture()`, run with the GIL released: pure C++ under the store's
// locks) as a RecordBuffer.
template <class Capture>
std::unique_ptr<RecordBuffer> capture_buffer(Capture&& capture) {
  std::string bytes;
  {
    const py::gil_scoped_release release;
    bytes = std::forward<Capture>(capture)();
  }
  return std::make_unique<RecordBuffer>(std::move(bytes));
}

// The Python type name of `object`, for error messages.
inline std::string type_name(py::handle object) { return Py_TYPE(object.ptr())->tp_name; }

// A store capture (`capture()`, run with the GIL released: pure C++ under the store's
// locks) written into the bytearray `out`, resized to the capture's length, instead of into
// a new bytes object: a caller that captures periodically reuses one buffer whose pages are
// mapped already, where a new object of tens of MB faults in every page afresh.
template <class Capture>
void capture_into(const py::object& out, Capture&& capture) {
  if (!PyByteArray_Check(out.ptr())) {
    throw py::type_error("snapshot_into: out must be a bytearray, got " + type_name(out));
  }
  // A bytearray someone holds a view of cannot be resized (BufferError): found out here,
  // before the capture resets the change tracking, by a resize to one more byte and back
  // (within the allocation, so nothing moves).
  const Py_ssize_t size = PyByteArray_GET_SIZE(out.ptr());
  if (PyByteArray_Resize(out.ptr(), size + 1) != 0 || PyByteArray_Resize(out.ptr(), size) != 0) {
    throw py::error_already_set();
  }
  std::string bytes;
  {
    const py::gil_scoped_release release;
    bytes = std::forward<Capture>(capture)();
  }
  // Only a view taken by another thread during the capture makes this fail; the capture
  // is then lost with the change tracking it reset, as when snapshot() cannot allocate
  // its bytes.
  if (PyByteArray_Resize(out.ptr(), static_cast<Py_ssize_t>(bytes.size())) != 0) {
    throw py::error_already_set();
  }
  // With the GIL held: another thread could otherwise resize `out` under the copy.
  std::memcpy(PyByteArray_AS_STRING(out.ptr()), bytes.data(), bytes.size());
  recycle_record_buffer(std::move(bytes));
}

// Releases the Python reference a keep-alive holds, from whichever thread drops it last.
struct ReleasePyObject {
  void operator()(PyObject* object) const noexcept {
    const PyGILState_STATE state = PyGILState_Ensure();
    Py_DECREF(object);
    PyGILState_Release(state);
  }
};

// Input for a decoder that runs without the GIL. Decoders validate a length and then use it,
// so the bytes must not change underneath them: a bytes object is immutable and is read in
// place; any other buffer (bytearray, memoryview, numpy array) is copied once, with the GIL
// held, into memory this object owns. Another thread flipping bytes in the caller's
// bytearray then changes nothing the decoder sees.
class ImmutableInput {
 public:
  explicit ImmutableInput(py::handle object) {
    if (PyBytes_Check(object.ptr())) {
      view_ = {PyBytes_AS_STRING(object.ptr()), static_cast<std::size_t>(PyBytes_GET_SIZE(object.ptr()))};
      owner_ = std::shared_ptr<PyObject>(Py_NewRef(object.ptr()), ReleasePyObject{});
      return;
    }
    const BufferView buffer(object);
    auto copy = std::make_shared<std::string>(buffer.view());
    view_ = *copy;
    owner_ = std::move(copy);
  }

  [[nodiscard]] std::string_view view() const noexcept { return view_; }
  [[nodiscard]] std::size_t size() const noexcept { return view_.size(); }
  // Keeps the viewed memory alive for a consumer that wants to hold on to it (the state
  // backend indexes a restored snapshot in place).
  [[nodiscard]] const std::shared_ptr<const void>& keep_alive() const noexcept { return owner_; }

 private:
  std::string_view view_;
  std::shared_ptr<const void> owner_;
};

// What a sequence of byte strings may hold.
enum class ByteItems {
  kKeys,        // bytes, or buffers of single bytes (bytearray, memoryview, uint8 arrays)
  kKeysOrText,  // the same, or str (as UTF-8)
  kBuffers,     // any C-contiguous buffer (opaque values: a float64 array is its bytes)
};

inline const char* byte_items_description(ByteItems kind) noexcept {
  switch (kind) {
    case ByteItems::kKeys:
      return "bytes (or a bytes-like object of single bytes)";
    case ByteItems::kKeysOrText:
      return "bytes or str";
    case ByteItems::kBuffers:
      return "a bytes-like object";
  }
  return "bytes";
}

// The bytes `item` stands for, valid while `item` lives (or, for a pinned buffer, while
// `pin` does): bytes in place, str as its cached UTF-8 (kKeysOrText), or a buffer (pinned).
// Keys refuse buffers of wider items, numpy integers in particular: their raw machine
// bytes would silently become an unrelated byte-string key. Returns false for a refused
// object; the caller raises, naming the argument.
inline bool byte_string_view(PyObject* item, ByteItems kind, std::string_view& out,
                             std::unique_ptr<BufferView>& pin) {
  if (PyBytes_Check(item)) {
    out = {PyBytes_AS_STRING(item), static_cast<std::size_t>(PyBytes_GET_SIZE(item))};
    return true;
  }
  if (PyUnicode_Check(item)) {
    if (kind != ByteItems::kKeysOrText) return false;
    Py_ssize_t size = 0;
    const char* data = PyUnicode_AsUTF8AndSize(item, &size);
    if (data == nullptr) throw py::error_already_set();
    out = {data, static_cast<std::size_t>(size)};
    return true;
  }
  if (PyObject_CheckBuffer(item) == 0) return false;
  if (kind != ByteItems::kBuffers) {
    Py_buffer probe{};
    if (PyObject_GetBuffer(item, &probe, PyBUF_FORMAT | PyBUF_ND) != 0) {
      PyErr_Clear();
      return false;
    }
    const std::string_view format = probe.format == nullptr ? "B" : probe.format;
    const bool single_bytes =
        probe.itemsize == 1 && (format == "B" || format == "b" || format == "c");
    PyBuffer_Release(&probe);
    if (!single_bytes) return false;
  }
  pin = std::make_unique<BufferView>(item);
  out = pin->view();
  return true;
}

// One key argument (a point lookup or a single publish).
class KeyBytes {
 public:
  KeyBytes(py::handle key, ByteItems kind, const char* what) {
    if (!byte_string_view(key.ptr(), kind, view_, pin_)) {
      throw py::type_error(std::string(what) + " must be " + byte_items_description(kind) +
                           ", not " + type_name(key));
    }
  }
  [[nodiscard]] std::string_view view() const noexcept { return view_; }

 private:
  std::unique_ptr<BufferView> pin_;
  std::string_view view_;
};

// A sequence of byte strings pinned for use without the GIL: the items are copied into a
// private tuple (so another thread mutating the caller's list cannot free them), bytes and
// str are viewed in place (both immutable; str as its cached UTF-8), and buffers of single
// bytes are held through the buffer protocol (which also stops a bytearray from resizing).
// Every item is checked here, before the caller folds the first one.
class PinnedByteStrings {
 public:
  // `keep_views`: build the view of every item now (one 16-byte view per item); otherwise
  // the caller asks for them chunk by chunk with fill_views.
  PinnedByteStrings(py::handle sequence, ByteItems kind, const char* what, bool keep_views = true)
      : kind_(kind) {
    if (PyUnicode_Check(sequence.ptr()) || PyBytes_Check(sequence.ptr())) {
      throw py::type_error(std::string(what) + " must be a sequence of byte strings, not a single " +
                           type_name(sequence));
    }
    PyObject* tuple = PySequence_Tuple(sequence.ptr());
    if (tuple == nullptr) throw py::error_already_set();
    items_ = py::reinterpret_steal<py::tuple>(tuple);
    const auto n = static_cast<std::size_t>(PyTuple_GET_SIZE(tuple));
    if (keep_views) views_.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      std::string_view view;
      std::unique_ptr<BufferView> pin;
      if (!byte_string_view(PyTuple_GET_ITEM(tuple, static_cast<Py_ssize_t>(i)), kind, view, pin)) {
        const std::string index = std::to_string(i);
        if (PyTuple_GET_ITEM(tuple, static_cast<Py_ssize_t>(i)) == Py_None && kind != ByteItems::kBuffers) {
          throw py::value_error(std::string(what) + "[" + index +
                                "] is None: keys cannot be null (drop or fill nulls first)");
        }
        throw py::type_error(std::string(what) + "[" + index + "]: the item at index " + index +
                             " must be " + byte_items_description(kind) + ", not " +
                             type_name(PyTuple_GET_ITEM(tuple, static_cast<Py_ssize_t>(i))));
      }
      if (pin) pins_.emplace_back(i, std::move(pin));
      if (keep_views) views_.push_back(view);
      total_ += view.size();
    }
  }

  [[nodiscard]] std::size_t size() const noexcept {
    return static_cast<std::size_t>(PyTuple_GET_SIZE(items_.ptr()));
  }
  // Every item's view (only with keep_views).
  [[nodiscard]] const std::vector<std::string_view>& views() const noexcept { return views_; }
  [[nodiscard]] std::size_t total_bytes() const noexcept { return total_; }

  // Replaces `out` with the views of items [begin, end); needs the GIL (str items are read
  // through their cached UTF-8), the views stay valid while this object lives.
  void fill_views(std::size_t begin, std::size_t end, std::vector<std::string_view>& out) const {
    out.clear();
    auto pin = std::lower_bound(pins_.begin(), pins_.end(), begin,
                                [](const auto& entry, std::size_t i) { return entry.first < i; });
    for (std::size_t i = begin; i < end; ++i) {
      if (pin != pins_.end() && pin->first == i) {
        out.push_back((pin++)->second->view());
        continue;
      }
      std::string_view view;
      std::unique_ptr<BufferView> unused;
      (void)byte_string_view(PyTuple_GET_ITEM(items_.ptr(), static_cast<Py_ssize_t>(i)), kind_,
                             view, unused);
      out.push_back(view);
    }
  }

 private:
  ByteItems kind_;
  py::tuple items_;
  std::vector<std::pair<std::size_t, std::unique_ptr<BufferView>>> pins_;  // ascending index
  std::vector<std::string_view> views_;
  std::size_t total_ = 0;
};

}  // namespace streamstate::bindings
