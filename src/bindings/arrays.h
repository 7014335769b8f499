// numpy in and out: the one set of rules for key and value columns (what dtypes are taken,
// what is refused rather than silently cast), and handing C++ buffers to numpy without a copy.
#pragma once

#include "bindings/buffers.h"
#include "bindings/prelude.h"
#include "core/errors.h"

#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <optional>
#include <string>

namespace streamstate::bindings {

using Float64Array = py::array_t<double, py::array::c_style | py::array::forcecast>;
using Int64Array = py::array_t<std::int64_t, py::array::c_style | py::array::forcecast>;

// A one-dimensional float64 column from any numeric array-like (cast, since every number
// has a float64 value).
inline Float64Array float_values(py::handle values) {
  auto array = Float64Array::ensure(values);
  if (!array) {
    PyErr_Clear();
    throw py::type_error("values must be a float64 array-like (numbers), got " + type_name(values));
  }
  if (array.ndim() != 1) {
    throw InvalidArgument("values must be one-dimensional, got " + std::to_string(array.ndim()) +
                          " dimensions");
  }
  return array;
}

// A one-dimensional int64 key column from any signed integer array-like, or unsigned up to
// 32 bits. Floats and bools are refused rather than truncated; uint64 is refused too (with
// OverflowError when a value is beyond int64, which would otherwise wrap to a negative key).
inline Int64Array int_keys(py::handle keys) {
  if (PyUnicode_Check(keys.ptr()) || PyBytes_Check(keys.ptr())) {
    throw py::type_error("keys must be an integer array for key_type='int64', not " + type_name(keys));
  }
  auto array = py::array::ensure(keys);
  if (!array) {
    PyErr_Clear();
    throw py::type_error("keys must be an integer array-like for key_type='int64', not " +
                         type_name(keys));
  }
  if (array.ndim() != 1) {
    throw InvalidArgument("keys must be one-dimensional, got " + std::to_string(array.ndim()) +
                          " dimensions");
  }
  const char kind = array.dtype().kind();
  const bool integer = kind == 'i' || (kind == 'u' && array.dtype().itemsize() <= 4);
  if (!integer && array.size() > 0) {
    if (kind == 'u') {
      const auto max = py::int_(array.attr("max")());
      if (max > py::int_(std::numeric_limits<std::int64_t>::max())) {
        PyErr_SetString(PyExc_OverflowError, "a uint64 key does not fit in int64");
        throw py::error_already_set();
      }
    }
    throw py::type_error("keys must be integers (int32 or int64) for key_type='int64', got dtype " +
                         py::str(array.dtype()).cast<std::string>() +
                         (kind == 'f' ? " (cast float keys explicitly with .astype('int64'))" : ""));
  }
  auto out = Int64Array::ensure(array);
  if (!out) throw py::error_already_set();
  return out;
}

// One int64 key: an int or numpy integer (not bool, float or str). nullopt when the value is
// an integer outside int64 (no such key can exist).
inline std::optional<std::int64_t> int64_key(py::handle key) {
  if (PyBool_Check(key.ptr()) || PyFloat_Check(key.ptr()) || PyIndex_Check(key.ptr()) == 0) {
    throw py::type_error("key must be an int for key_type='int64', not " + type_name(key));
  }
  const auto index = py::reinterpret_steal<py::object>(PyNumber_Index(key.ptr()));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  const long long value = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
  if (value == -1 && PyErr_Occurred() != nullptr) throw py::error_already_set();
  if (overflow != 0) return std::nullopt;
  return static_cast<std::int64_t>(value);
}

inline void check_lengths(std::size_t keys, std::size_t values) {
  if (keys != values) {
    throw InvalidArgument("keys and values differ in length: " + std::to_string(keys) + " keys, " +
                          std::to_string(values) + " values");
  }
}

// A numpy array that takes ownership of a C++ buffer (freed when the array is collected).
template <class T>
py::array_t<T> adopt(std::unique_ptr<T[]> data, std::size_t n) {
  const py::capsule owner(data.get(), [](void* p) { delete[] static_cast<T*>(p); });
  T* raw = data.release();  // the capsule owns it from here on
  return py::array_t<T>(static_cast<py::ssize_t>(n), raw, owner);
}

}  // namespace streamstate::bindings
