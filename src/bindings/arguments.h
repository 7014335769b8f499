// Scalar arguments, converted in one place each. Bound functions take their scalar
// parameters as Python objects and convert them here, so a wrong argument raises a
// TypeError (wrong type) or ValueError (out of range) naming the parameter and what it
// needs. pybind11 offers no hook into its own overload-resolution failure, whose message
// ("incompatible function arguments ... Invoked with") names neither.
#pragma once

#include "bindings/buffers.h"
#include "bindings/prelude.h"

#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

namespace streamstate::bindings {

// What an int outside its range raises: ValueError when the range is a rule of the
// argument (a partition id below num_partitions), TypeError when it is the argument's type
// (a CRC-32C value is a 32-bit unsigned int).
enum class OutOfRange { kValueError, kTypeError };

// An int (or any object with __index__, such as a numpy integer; never bool or float) in
// [lo, hi].
template <class Int>
Int int_arg(py::handle value, const char* name, Int lo = std::numeric_limits<Int>::min(),
            Int hi = std::numeric_limits<Int>::max(),
            OutOfRange out_of_range = OutOfRange::kValueError) {
  const auto range = [&] {
    return std::string(" [") + std::to_string(lo) + ", " + std::to_string(hi) + "]";
  };
  if (PyBool_Check(value.ptr()) || PyFloat_Check(value.ptr()) || PyIndex_Check(value.ptr()) == 0) {
    throw py::type_error(std::string(name) + " must be an int in" + range() + ", not " +
                         type_name(value));
  }
  const auto index = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
  if (!index) throw py::error_already_set();
  int overflow = 0;
  bool in_range = false;
  Int result{};
  if constexpr (std::numeric_limits<Int>::is_signed) {
    const long long v = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (v == -1 && PyErr_Occurred() != nullptr) throw py::error_already_set();
    in_range = overflow == 0 && v >= static_cast<long long>(lo) && v <= static_cast<long long>(hi);
    result = static_cast<Int>(v);
  } else {
    const long long as_signed = PyLong_AsLongLongAndOverflow(index.ptr(), &overflow);
    if (as_signed == -1 && PyErr_Occurred() != nullptr) throw py::error_already_set();
    if (overflow < 0 || (overflow == 0 && as_signed < 0)) {
      in_range = false;
    } else {
      const unsigned long long v = PyLong_AsUnsignedLongLong(index.ptr());
      if (v == static_cast<unsigned long long>(-1) && PyErr_Occurred() != nullptr) {
        PyErr_Clear();  // above 2**64
      } else {
        in_range = v >= static_cast<unsigned long long>(lo) && v <= static_cast<unsigned long long>(hi);
        result = static_cast<Int>(v);
      }
    }
  }
  if (!in_range) {
    const std::string message =
        std::string(name) + " must be in" + range() + ", got " + py::repr(index).cast<std::string>();
    if (out_of_range == OutOfRange::kTypeError) throw py::type_error(message);
    throw py::value_error(message);
  }
  return result;
}

// A real number: a float, an int, or anything with __float__ (numpy floats); not bool.
inline double float_arg(py::handle value, const char* name) {
  if (PyFloat_Check(value.ptr())) return PyFloat_AS_DOUBLE(value.ptr());
  if (!PyBool_Check(value.ptr())) {
    const double result = PyFloat_AsDouble(value.ptr());
    if (result != -1.0 || PyErr_Occurred() == nullptr) return result;
    if (PyErr_ExceptionMatches(PyExc_OverflowError) != 0) throw py::error_already_set();
    PyErr_Clear();
  }
  throw py::type_error(std::string(name) + " must be a number (int or float), not " +
                       type_name(value));
}

inline std::optional<double> optional_float_arg(py::handle value, const char* name) {
  if (value.is_none()) return std::nullopt;
  return float_arg(value, name);
}

// A str that must be one of `choices`.
inline std::string_view choice_arg(py::handle value, const char* name,
                                   std::initializer_list<std::string_view> choices) {
  std::string expected;
  for (const std::string_view choice : choices) {
    if (!expected.empty()) expected += ", ";
    expected += "'" + std::string(choice) + "'";
  }
  if (!PyUnicode_Check(value.ptr())) {
    throw py::type_error(std::string(name) + " must be a str (one of " + expected + "), not " +
                         type_name(value));
  }
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(value.ptr(), &size);
  if (data == nullptr) throw py::error_already_set();
  const std::string_view text(data, static_cast<std::size_t>(size));
  for (const std::string_view choice : choices) {
    if (text == choice) return choice;
  }
  throw py::value_error(std::string(name) + " must be one of " + expected + ", got '" +
                        std::string(text) + "'");
}

// A path or other text argument.
inline std::string str_arg(py::handle value, const char* name) {
  if (!PyUnicode_Check(value.ptr())) {
    throw py::type_error(std::string(name) + " must be a str, not " + type_name(value));
  }
  return value.cast<std::string>();
}

// An immutable bytes object (a key the core may keep referring to without a copy).
inline std::string_view bytes_arg(py::handle value, const char* name) {
  if (!PyBytes_Check(value.ptr())) {
    throw py::type_error(std::string(name) + " must be bytes, not " + type_name(value));
  }
  return {PyBytes_AS_STRING(value.ptr()), static_cast<std::size_t>(PyBytes_GET_SIZE(value.ptr()))};
}

// A buffer argument, with a clear TypeError for an object that has no buffer.
// An iterable (list, tuple, generator, ...), or a TypeError naming the parameter.
inline py::iterable iterable_arg(py::handle value, const char* name) {
  if (!py::isinstance<py::iterable>(value) || PyBytes_Check(value.ptr()) ||
      PyUnicode_Check(value.ptr())) {
    throw py::type_error(std::string(name) + " must be an iterable of pairs, not " +
                         type_name(value));
  }
  return py::reinterpret_borrow<py::iterable>(value);
}

inline void require_buffer(py::handle value, const char* name) {
  if (PyObject_CheckBuffer(value.ptr()) == 0) {
    throw py::type_error(std::string(name) +
                         " must be a bytes-like object (bytes, bytearray, memoryview, numpy "
                         "array), not " + type_name(value));
  }
}

}  // namespace streamstate::bindings
