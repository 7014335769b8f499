#include "bindings/arguments.h"
#include "bindings/prelude.h"
#include "core/checksum.h"

#include <cstdint>
#include <limits>
#include <string>

namespace streamstate::bindings {
namespace {

// Checksums read each byte of the pinned buffer once, so a buffer another thread changes
// meanwhile gives some checksum, never a read outside it: no copy is needed.
template <std::uint32_t (*Crc)(std::string_view, std::uint32_t) noexcept>
std::uint32_t crc_of(const py::object& data, const py::object& value) {
  require_buffer(data, "data");
  const std::uint32_t seed = int_arg<std::uint32_t>(
      value, "value", 0, std::numeric_limits<std::uint32_t>::max(), OutOfRange::kTypeError);
  const BufferView buffer(data);
  // Pure C++ over a pinned buffer: no Python object is touched while released.
  const MaybeReleaseGil release(buffer.size());
  return Crc(buffer.view(), seed);
}

}  // namespace

void register_checksum(py::module_& m) {
  m.def("crc32c", &crc_of<&crc32c>, py::arg("data"), py::arg("value") = 0,
        "CRC-32C (Castagnoli) of any bytes-like object, continuing from ``value`` (a previous\n"
        "result, 0 to 2**32-1), so ``crc32c(b, crc32c(a)) == crc32c(a + b)``.");
  m.def("crc32c_portable", &crc_of<&crc32c_portable>, py::arg("data"), py::arg("value") = 0,
        "CRC-32C with the portable table implementation (for tests and benchmarks).");
  m.def("_crc32c_single_stream", &crc_of<&crc32c_single_stream>, py::arg("data"),
        py::arg("value") = 0,
        "CRC-32C over one hardware stream, without interleaving (benchmark baseline).");
  m.def("crc32c_is_hardware", &crc32c_is_hardware,
        "True when crc32c() uses the CPU's crc32 instruction.");
  m.def(
      "sha256_hex",
      [](const py::object& data) {
        require_buffer(data, "data");
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
