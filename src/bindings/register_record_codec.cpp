#include "bindings/arguments.h"
#include "bindings/buffers.h"
#include "bindings/prelude.h"

#include <pybind11/native_enum.h>
#include "core/errors.h"
#include "core/record_codec.h"

#include <memory>
#include <string>
#include <vector>

namespace streamstate::bindings {

void register_record_codec(py::module_& m) {
  // The one definition of the kinds: Python's streamstate.codec.RecordKind is this enum.
  py::native_enum<RecordKind>(m, "RecordKind", "enum.IntEnum",
                              "Which component wrote a snapshot container (its kind tag).")
      .value("USER", RecordKind::kUser, "free for callers of encode_records")
      .value("AGGREGATE_STORE", RecordKind::kAggregateStore)
      .value("NUMERIC_AGGREGATE_STORE", RecordKind::kNumericAggregateStore)
      .value("STATE_BACKEND", RecordKind::kStateBackend)
      .value("SPILL_RUN", RecordKind::kSpillRun)
      .value("NUMERIC_AGGREGATE_STORE_DELTA", RecordKind::kNumericAggregateStoreDelta)
      .value("AGGREGATE_STORE_DELTA", RecordKind::kAggregateStoreDelta)
      .value("STATE_BACKEND_DELTA", RecordKind::kStateBackendDelta)
      .value("WINDOW_STORE", RecordKind::kWindowStore)
      .value("WINDOW_STORE_DELTA", RecordKind::kWindowStoreDelta)
      .value("DELTA", RecordKind::kDelta, "an incremental checkpoint (streamstate.delta)")
      .finalize();
  py::class_<RecordBuffer>(m, "RecordBuffer", py::buffer_protocol(), R"doc(
A store's capture (a checksummed record container) whose bytes live in C++ memory, read
without a copy through the buffer protocol: ``memoryview(buf)``, ``bytes(buf)``, hashing,
uploading and ``restore()`` accept it. Read-only.
)doc")
      .def_buffer([](const RecordBuffer& self) {
        const std::string_view bytes = self.view();
        return py::buffer_info(const_cast<char*>(bytes.data()), 1,
                               py::format_descriptor<std::uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(bytes.size())}, {py::ssize_t{1}},
                               /*readonly=*/true);
      })
      .def(
          "__len__", [](const RecordBuffer& self) { return self.view().size(); },
          "The capture's size in bytes.")
      .def(
          "__repr__",
          [](const RecordBuffer& self) {
            return "RecordBuffer(" + std::to_string(self.view().size()) + " bytes)";
          },
          "RecordBuffer(<size> bytes).");
  m.def(
      "encode_records",
      [](const py::object& kind_arg, const py::object& records_arg) {
        const auto kind = int_arg<std::uint16_t>(kind_arg, "kind");
        const py::iterable records = iterable_arg(records_arg, "records");
        // Pin every buffer first (needs the GIL), then build the container without it.
        std::vector<std::pair<py::object, py::object>> owners;
        std::vector<std::unique_ptr<BufferView>> pins;
        std::vector<RecordView> views;
        std::size_t total = 0;
        for (const py::handle item : records) {
          if (!py::isinstance<py::sequence>(item) || py::len(item) != 2) {
            throw py::type_error("encode_records: each record must be a (key, value) pair");
          }
          const auto pair = py::reinterpret_borrow<py::sequence>(item);
          owners.emplace_back(pair[0], pair[1]);
          pins.push_back(std::make_unique<BufferView>(owners.back().first));
          pins.push_back(std::make_unique<BufferView>(owners.back().second));
          views.push_back({pins[pins.size() - 2]->view(), pins.back()->view()});
          total += views.back().key.size() + views.back().value.size();
        }
        std::string out;
        {
          const MaybeReleaseGil release(total);
          out = encode_records(kind, views);
        }
        return py::bytes(out);
      },
      py::arg("kind"), py::arg("records"),
      "Encode (key, value) byte pairs into the checksummed snapshot container.");
  m.def(
      "decode_records",
      [](const py::object& data) {
        // Decoded without the GIL: a copy (or immutable bytes) no other thread can change.
        const ImmutableInput buffer(data);
        std::unique_ptr<RecordReader> reader;
        {
          const MaybeReleaseGil release(buffer.size());
          reader = std::make_unique<RecordReader>(buffer.view());
        }
        py::list records(static_cast<py::ssize_t>(reader->count()));
        RecordView record;
        py::ssize_t i = 0;
        while (reader->next(record)) {
          records[i++] = py::make_tuple(py::bytes(record.key.data(), record.key.size()),
                                        py::bytes(record.value.data(), record.value.size()));
        }
        return py::make_tuple(reader->kind(), records);
      },
      py::arg("data"),
      "Validate and decode a snapshot container into (kind, [(key, value), ...]).");
}

}  // namespace streamstate::bindings
