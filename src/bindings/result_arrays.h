// Finished result columns handed to Python without copying them: numpy arrays that take over
// the core's buffers, and byte-string key columns in the form the caller asks for (a list of
// bytes or of str, or Arrow's offsets + data buffers for pyarrow.Array.from_buffers).
#pragma once

#include "bindings/arguments.h"
#include "bindings/prelude.h"
#include "core/errors.h"
#include "core/key_traits.h"
#include "core/result_columns.h"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace streamstate::bindings {

// How a result hands out byte-string keys: a list of bytes, a list of str (the keys are
// UTF-8 text), or "arrow": an (offsets, data) pair of numpy arrays in Arrow's binary layout.
enum class KeyFormat { kBytes, kStr, kArrow };

inline KeyFormat key_format_arg(py::handle value) {
  const std::string_view name = choice_arg(value, "key_format", {"bytes", "str", "arrow"});
  if (name == "str") return KeyFormat::kStr;
  if (name == "arrow") return KeyFormat::kArrow;
  return KeyFormat::kBytes;
}

// Owns a GrowableBuffer's mapped memory on behalf of the numpy array that views it.
struct MappedColumn {
  char* data;
  std::size_t capacity;
  MappedColumn(char* d, std::size_t c) noexcept : data(d), capacity(c) {}
  ~MappedColumn() { GrowableBuffer::free_memory(data, capacity); }
  MappedColumn(const MappedColumn&) = delete;
  MappedColumn& operator=(const MappedColumn&) = delete;
  MappedColumn(MappedColumn&&) = delete;
  MappedColumn& operator=(MappedColumn&&) = delete;
};

// A numpy array of the first n values of `buffer`, which it takes over (freed with the array).
template <class T>
py::array_t<T> adopt_buffer(GrowableBuffer& buffer, std::size_t n) {
  if (n == 0) return py::array_t<T>(0);
  const std::size_t capacity = buffer.capacity();
  auto holder = std::make_unique<MappedColumn>(buffer.release(), capacity);
  T* data = reinterpret_cast<T*>(holder->data);
  const py::capsule owner(holder.get(), [](void* p) { delete static_cast<MappedColumn*>(p); });
  (void)holder.release();  // the capsule owns it now
  return py::array_t<T>({static_cast<py::ssize_t>(n)}, {static_cast<py::ssize_t>(sizeof(T))},
                        data, owner);
}

// A numpy array over a container's memory (moved into the array's owner, not copied).
template <class T, class Container>
py::array_t<T> adopt_container(Container&& values) {
  if (values.empty()) return py::array_t<T>(0);
  auto holder = std::make_unique<Container>(std::move(values));
  const auto n = static_cast<py::ssize_t>(holder->size() * sizeof(*holder->data()) / sizeof(T));
  const T* data = reinterpret_cast<const T*>(holder->data());
  const py::capsule owner(holder.get(), [](void* p) { delete static_cast<Container*>(p); });
  (void)holder.release();  // the capsule owns it now
  return py::array_t<T>({n}, {static_cast<py::ssize_t>(sizeof(T))}, data, owner);
}

// Arrow binary keys as (offsets, data): int32 or int64 offsets (n + 1 of them), uint8 data.
inline py::tuple arrow_key_buffers(ArrowOffsets& offsets, py::object data) {
  const std::size_t n = offsets.keys() + 1;
  py::object column = offsets.large()
                          ? py::object(adopt_buffer<std::int64_t>(offsets.buffer(), n))
                          : py::object(adopt_buffer<std::int32_t>(offsets.buffer(), n));
  return py::make_tuple(std::move(column), std::move(data));
}

// Keys as a list of bytes or (text) of str. A key_type='str' result holds text, so a key
// that is not UTF-8 (folded as bytes, or restored from a bytes store's snapshot) raises
// CorruptDataError naming it.
class KeyList {
 public:
  KeyList(std::size_t n, bool text) : list_(static_cast<py::ssize_t>(n)), text_(text) {}

  void append(std::string_view key) {
    const auto size = static_cast<Py_ssize_t>(key.size());
    PyObject* item = text_ ? PyUnicode_DecodeUTF8(key.data(), size, "strict")
                           : PyBytes_FromStringAndSize(key.data(), size);
    if (item == nullptr) {
      if (text_ && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError) != 0) {
        PyErr_Clear();
        throw CorruptDataError("key " + std::to_string(next_) +
                               " of a key_type='str' result is not UTF-8 text (fold byte-string "
                               "keys into key_type='bytes')");
      }
      throw py::error_already_set();
    }
    PyList_SET_ITEM(list_.ptr(), next_++, item);
  }
  [[nodiscard]] py::list take() noexcept { return std::move(list_); }

 private:
  py::list list_;
  bool text_;
  Py_ssize_t next_ = 0;
};

// Byte-string keys in `format`; the Arrow form hands the key bytes over without a copy.
inline py::object bytes_key_column(BytesKeys::KeyColumn&& keys, KeyFormat format) {
  if (format == KeyFormat::kArrow) {
    ArrowOffsets offsets = [&] {
      const py::gil_scoped_release release;  // pure C++ over the column this call owns
      return arrow_offsets(keys.ends);
    }();
    std::vector<std::size_t>().swap(keys.ends);
    return arrow_key_buffers(offsets, adopt_container<std::uint8_t>(std::move(keys.bytes)));
  }
  KeyList column(keys.size(), format == KeyFormat::kStr);
  const std::string_view bytes = keys.bytes;
  std::size_t begin = 0;
  for (const std::size_t end : keys.ends) {
    column.append(bytes.substr(begin, end - begin));
    begin = end;
  }
  return column.take();
}

}  // namespace streamstate::bindings
