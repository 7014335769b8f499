#include "bindings/prelude.h"

namespace streamstate::bindings {

void register_checkpoint_batch(py::module_& /*m*/) {}

}  // namespace streamstate::bindings
