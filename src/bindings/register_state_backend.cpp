#include "bindings/prelude.h"

namespace streamstate::bindings {

void register_state_backend(py::module_& /*m*/) {}

}  // namespace streamstate::bindings
