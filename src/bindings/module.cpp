#include "bindings/prelude.h"

#include <string>

namespace streamstate::bindings {
namespace {

// pybind11 lets `X.__new__(X)` make an instance whose C++ object was never constructed, and
// then hands a method fresh uninitialised memory of the right size as `self` (its lazy
// allocation, meant for placement-new constructors). Every class here constructs through a
// factory or py::init, so that allocation is only ever reached by such an instance: making
// it throw turns a crash into a TypeError, for every method of every class at once.
void* refuse_uninitialized_self(std::size_t /*size*/) {
  throw py::type_error(
      "this streamstate object was created with __new__ but never initialised; create it by "
      "calling the class (which runs __init__)");
}

}  // namespace

void refuse_uninitialized_instances(py::module_& m) {
  for (const auto item : m.attr("__dict__").cast<py::dict>()) {
    // Only pybind11 classes (their metaclass is pybind11's); the exception classes are not.
    if (Py_TYPE(item.second.ptr()) != py::detail::get_internals().default_metaclass) continue;
    auto* type = reinterpret_cast<PyTypeObject*>(item.second.ptr());
    if (py::detail::type_info* info = py::detail::get_type_info(type)) {
      info->operator_new = &refuse_uninitialized_self;
    }
  }
}

}  // namespace streamstate::bindings

PYBIND11_MODULE(_core, m) {
  m.doc() = "streamstate's compiled core; use the public names in the streamstate package.";
  using namespace streamstate::bindings;
  register_errors(m);
  register_checksum(m);
  register_lz4_block(m);
  register_record_codec(m);
  register_aggregate_store(m);
  register_state_backend(m);
  register_spilling_aggregator(m);
  register_checkpoint_batch(m);
  register_partition_router(m);
  register_window_store(m);
  refuse_uninitialized_instances(m);
}
