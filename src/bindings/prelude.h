// Included first by every binding file: the pybind11 namespace alias, releasing the GIL, and
// handing back bytes without extra copies. Taking arguments: buffers.h (bytes and buffers),
// arguments.h (scalars), arrays.h (numpy columns), key_dispatch.h (key_type, nan_policy).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstddef>
#include <string_view>
#include <utility>

namespace py = pybind11;

namespace streamstate::bindings {

// Below this many bytes, releasing and re-taking the GIL costs more than the work itself.
inline constexpr std::size_t kReleaseGilThreshold = 8 * 1024;

// A read-only view of any C-contiguous buffer (bytes, bytearray, memoryview, numpy array),
// held for the view's lifetime without copying. Declare it before any gil_scoped_release:
// the buffer must be released with the GIL held, which reverse destruction order guarantees.
// While it is held a bytearray cannot be resized, but another thread may still change its
// contents: only code that reads each byte once (checksums, copies, hashing) may use it
// without the GIL. Decoders use ImmutableInput (buffers.h) instead.
class BufferView {
 public:
  explicit BufferView(py::handle object) {
    if (PyObject_GetBuffer(object.ptr(), &view_, PyBUF_SIMPLE) != 0) throw py::error_already_set();
  }
  ~BufferView() { PyBuffer_Release(&view_); }
  BufferView(const BufferView&) = delete;
  BufferView& operator=(const BufferView&) = delete;
  BufferView(BufferView&&) = delete;
  BufferView& operator=(BufferView&&) = delete;

  [[nodiscard]] std::string_view view() const noexcept {
    return {static_cast<const char*>(view_.buf), static_cast<std::size_t>(view_.len)};
  }
  [[nodiscard]] std::size_t size() const noexcept { return static_cast<std::size_t>(view_.len); }

 private:
  Py_buffer view_{};
};

// Releases the GIL only when the work is large enough to be worth it.
class MaybeReleaseGil {
 public:
  explicit MaybeReleaseGil(std::size_t work_bytes)
      : state_(work_bytes >= kReleaseGilThreshold ? PyEval_SaveThread() : nullptr) {}
  ~MaybeReleaseGil() {
    if (state_ != nullptr) PyEval_RestoreThread(state_);
  }
  MaybeReleaseGil(const MaybeReleaseGil&) = delete;
  MaybeReleaseGil& operator=(const MaybeReleaseGil&) = delete;
  MaybeReleaseGil(MaybeReleaseGil&&) = delete;
  MaybeReleaseGil& operator=(MaybeReleaseGil&&) = delete;

 private:
  PyThreadState* state_;
};

// Allocates a bytes object of `capacity`, lets `fill(char*, capacity) -> used` write into it
// with the GIL released (the object is private to this call until returned, so no other
// thread can see it), then trims it to `used`. Saves the copy a std::string detour costs.
template <typename Fill>
py::bytes bytes_filled_by(std::size_t capacity, std::size_t work_bytes, Fill&& fill) {
  PyObject* raw = PyBytes_FromStringAndSize(nullptr, static_cast<Py_ssize_t>(capacity));
  if (raw == nullptr) throw py::error_already_set();
  auto result = py::reinterpret_steal<py::object>(raw);
  std::size_t used = 0;
  {
    const MaybeReleaseGil release(work_bytes);
    used = std::forward<Fill>(fill)(PyBytes_AS_STRING(raw), capacity);
  }
  if (used != capacity) {
    PyObject* resized = result.release().ptr();
    if (_PyBytes_Resize(&resized, static_cast<Py_ssize_t>(used)) != 0) {
      throw py::error_already_set();
    }
    result = py::reinterpret_steal<py::object>(resized);
  }
  return py::reinterpret_borrow<py::bytes>(result);
}

// Makes every class of the module refuse use before __init__ (see module.cpp).
void refuse_uninitialized_instances(py::module_& m);

// Registration entry points, one per concept; module.cpp calls them all.
void register_errors(py::module_& m);
void register_checksum(py::module_& m);
void register_lz4_block(py::module_& m);
void register_record_codec(py::module_& m);
void register_aggregate_store(py::module_& m);
void register_state_backend(py::module_& m);
void register_spilling_aggregator(py::module_& m);
void register_checkpoint_batch(py::module_& m);
void register_partition_router(py::module_& m);
void register_window_store(py::module_& m);

}  // namespace streamstate::bindings
