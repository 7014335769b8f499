#include "bindings/prelude.h"
#include "core/lz4_block.h"

namespace streamstate::bindings {

void register_lz4_block(py::module_& m) {
  m.def(
      "lz4_compress",
      [](const py::object& data) {
        const BufferView buffer(data);
        const std::string_view input = buffer.view();
        return bytes_filled_by(lz4_compressed_bound(input.size()), input.size(),
                               [input](char* dst, std::size_t capacity) {
                                 return lz4_compress_into(input, dst, capacity);
                               });
      },
      py::arg("data"),
      "LZ4 block compression with a 4-byte little-endian size prefix "
      "(python-lz4's block.compress(store_size=True) layout).");
  m.def(
      "lz4_decompress",
      [](const py::object& data, std::size_t max_size) {
        const BufferView buffer(data);
        const std::string_view input = buffer.view();
        const std::size_t size = lz4_claimed_size(input, max_size);
        return bytes_filled_by(size, size, [input](char* dst, std::size_t capacity) {
          lz4_decompress_into(input, dst, capacity);
          return capacity;
        });
      },
      py::arg("data"), py::arg("max_size") = kDefaultMaxDecompressedSize,
      "Inverse of lz4_compress; refuses a claimed size above max_size before allocating.");
}

}  // namespace streamstate::bindings
