#include "bindings/prelude.h"

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
}
