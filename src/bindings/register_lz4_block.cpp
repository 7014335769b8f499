#include "bindings/arguments.h"
#include "bindings/buffers.h"
#include "bindings/prelude.h"
#include "core/lz4_block.h"

namespace streamstate::bindings {

void register_lz4_block(py::module_& m) {
  m.def(
      "lz4_compress",
      [](const py::object& data) {
        require_buffer(data, "data");
        // The compressor's reads are bounded by the pinned length whatever the bytes are, so
        // a buffer changed meanwhile gives some output, never a read outside it.
        const BufferView buffer(data);
        const std::string_view input = buffer.view();
        return bytes_filled_by(lz4_compressed_bound(input.size()), input.size(),
                               [input](char* dst, std::size_t capacity) {
                                 return lz4_compress_into(input, dst, capacity);
                               });
      },
      py::arg("data"),
      "LZ4 block compression of any bytes-like object, with a 4-byte little-endian size\n"
      "prefix (python-lz4's block.compress(store_size=True) layout).");
  m.def(
      "lz4_decompress",
      [](const py::object& data, const py::object& max_size) {
        require_buffer(data, "data");
        const std::size_t limit = int_arg<std::size_t>(max_size, "max_size");
        // The size prefix is checked and then relied on without the GIL: decode bytes no
        // other thread can change.
        const ImmutableInput input(data);
        const std::string_view compressed = input.view();
        const std::size_t size = lz4_claimed_size(compressed, limit);
        return bytes_filled_by(size, size, [compressed](char* dst, std::size_t capacity) {
          lz4_decompress_into(compressed, dst, capacity);
          return capacity;
        });
      },
      py::arg("data"), py::arg("max_size") = kDefaultMaxDecompressedSize,
      "Inverse of lz4_compress. A claimed size above ``max_size`` (bytes, default 1 GiB) or\n"
      "damaged input raises CorruptDataError before anything large is allocated.");
}

}  // namespace streamstate::bindings
