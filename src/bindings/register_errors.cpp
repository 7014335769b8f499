#include "bindings/prelude.h"
#include "core/errors.h"

namespace streamstate::bindings {
namespace {

// Stored once and never destroyed: a static py::object would be released after the
// interpreter is gone.
PYBIND11_CONSTINIT py::gil_safe_call_once_and_store<py::object> corrupt_data_error;
PYBIND11_CONSTINIT py::gil_safe_call_once_and_store<py::object> spill_error;

}  // namespace

// The exception classes live in Python (streamstate.errors) so they can carry attributes
// and docstrings; the core raises them through this one translator.
void register_errors(py::module_& m) {
  corrupt_data_error.call_once_and_store_result(
      [] { return py::module_::import("streamstate.errors").attr("CorruptDataError"); });
  spill_error.call_once_and_store_result(
      [] { return py::module_::import("streamstate.errors").attr("SpillError"); });
  m.attr("CorruptDataError") = corrupt_data_error.get_stored();
  m.attr("SpillError") = spill_error.get_stored();

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const CorruptDataError& e) {
      PyErr_SetString(corrupt_data_error.get_stored().ptr(), e.what());
    } catch (const SpillIoError& e) {
      // Built like any OSError: (errno, message, filename), so .errno and .filename work.
      const py::object& cls = spill_error.get_stored();
      const py::object instance = cls(e.error_number(), e.what(), e.path());
      PyErr_SetObject(cls.ptr(), instance.ptr());
    }
  });
}

}  // namespace streamstate::bindings
