#include "bindings/prelude.h"

namespace streamstate::bindings {

void register_spilling_aggregator(py::module_& /*m*/) {}

}  // namespace streamstate::bindings
