#include "bindings/prelude.h"

namespace streamstate::bindings {

void register_aggregate_store(py::module_& /*m*/) {}

}  // namespace streamstate::bindings
