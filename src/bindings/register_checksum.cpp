#include "bindings/prelude.h"
#include "core/checksum.h"

namespace streamstate::bindings {

void register_checksum(py::module_& m) {
  m.def(
      "crc32c",
      [](const py::object& data, std::uint32_t value) {
        const BufferView buffer(data);
        // Pure C++ over a pinned buffer: no Python object is touched while released.
        const MaybeReleaseGil release(buffer.size());
        return crc32c(buffer.view(), value);
      },
      py::arg("data"), py::arg("value") = 0,
      "CRC-32C (Castagnoli) of any bytes-like object, continuing from `value`.");
  m.def(
      "crc32c_portable",
      [](const py::object& data, std::uint32_t value) {
        const BufferView buffer(data);
        const MaybeReleaseGil release(buffer.size());
        return crc32c_portable(buffer.view(), value);
      },
      py::arg("data"), py::arg("value") = 0,
      "CRC-32C with the portable table implementation (for tests and benchmarks).");
  m.def(
      "_crc32c_single_stream",
      [](const py::object& data, std::uint32_t value) {
        const BufferView buffer(data);
        const MaybeReleaseGil release(buffer.size());
        return crc32c_single_stream(buffer.view(), value);
      },
      py::arg("data"), py::arg("value") = 0,
      "CRC-32C over one hardware stream, without interleaving (benchmark baseline).");
  m.def("crc32c_is_hardware", &crc32c_is_hardware,
        "True when crc32c() uses the CPU's crc32 instruction.");
  m.def(
      "sha256_hex",
      [](const py::object& data) {
        const BufferView buffer(data);
        std::string hex;
        {
          const MaybeReleaseGil release(buffer.size());
          hex = sha256_hex(buffer.view());
        }
        return hex;
      },
      py::arg("data"), "SHA-256 of any bytes-like object as 64 lowercase hex characters.");
  m.def("_noop", [] {}, "Does nothing; measures the cost of one call into the module.");
}

}  // namespace streamstate::bindings
