// A fold's value columns as the keyed stores take them: the names given at construction
// (values=[...]) and each batch's values, in whatever form they come, as one row-major block.
#pragma once

#include "bindings/arrays.h"
#include "bindings/buffers.h"
#include "bindings/prelude.h"
#include "core/errors.h"

#include <algorithm>
#include <cstddef>
#include <string>
#include <vector>

namespace streamstate::bindings {

// The store's value column names, "name" quoted and comma-separated (for error messages).
inline std::string quoted_names(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& name : names) {
    if (!out.empty()) out += ", ";
    out += "'" + name + "'";
  }
  return out;
}

// A fold's values as n rows of `width` float64s, row-major, whatever form they came in:
// a 1-D array (one column; the only form for the one unnamed column), a 2-D (n, width)
// array (converted to C-contiguous float64 if it is not), or a mapping {name: 1-D array}
// whose names are exactly the store's value columns (interleaved here into one block).
// Everything is checked before any row folds.
class ValueBlock {
 public:
  ValueBlock(py::handle values, const std::vector<std::string>& names, std::size_t width) {
    if (PyDict_Check(values.ptr()) != 0 ||
        (!py::isinstance<py::array>(values) && py::hasattr(values, "keys") &&
         py::hasattr(values, "__getitem__"))) {
      from_mapping(py::reinterpret_borrow<py::object>(values), names, width);
      return;
    }
    array_ = Float64Array::ensure(values);
    if (!array_) {
      PyErr_Clear();
      throw py::type_error("values must be a float64 array-like (numbers), a 2-D (n, columns) "
                           "array or a mapping {column: array}, got " + type_name(values));
    }
    if (names.empty() && array_.ndim() != 1) {
      // The one unnamed column takes a 1-D array, as it always did.
      throw InvalidArgument("values must be one-dimensional, got " +
                            std::to_string(array_.ndim()) + " dimensions");
    }
    if (array_.ndim() == 1) {
      if (width != 1) {
        throw InvalidArgument("values is one-dimensional but the store has " +
                              std::to_string(width) + " value columns (" + quoted_names(names) +
                              "): pass an (n, " + std::to_string(width) +
                              ") array or a mapping {column: array}");
      }
      rows_ = static_cast<std::size_t>(array_.shape(0));
    } else if (array_.ndim() == 2) {
      const auto columns = static_cast<std::size_t>(array_.shape(1));
      if (columns != width) {
        throw InvalidArgument("values has " + std::to_string(columns) + " columns, the store " +
                              std::to_string(width) + " value column" + (width == 1 ? "" : "s") +
                              (names.empty() ? std::string() : " (" + quoted_names(names) + ")"));
      }
      rows_ = static_cast<std::size_t>(array_.shape(0));
    } else {
      throw InvalidArgument("values must be one- or two-dimensional, got " +
                            std::to_string(array_.ndim()) + " dimensions");
    }
    data_ = array_.data();
  }

  [[nodiscard]] const double* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t rows() const noexcept { return rows_; }

 private:
  void from_mapping(const py::object& mapping, const std::vector<std::string>& names,
                    std::size_t width) {
    if (names.empty()) {
      throw InvalidArgument("values is a mapping but the store has one unnamed value column: "
                            "pass an array, or name the columns with values=[...]");
    }
    std::vector<std::string> given;
    for (const py::handle name : mapping.attr("keys")()) {
      if (!PyUnicode_Check(name.ptr())) {
        throw py::type_error("the names of a values mapping must be str, not " + type_name(name));
      }
      given.push_back(name.cast<std::string>());
    }
    std::vector<std::string> missing;
    std::vector<std::string> extra;
    for (const std::string& name : names) {
      if (std::find(given.begin(), given.end(), name) == given.end()) missing.push_back(name);
    }
    for (const std::string& name : given) {
      if (std::find(names.begin(), names.end(), name) == names.end()) extra.push_back(name);
    }
    if (!missing.empty() || !extra.empty()) {
      std::string message = "values mapping does not match the store's value columns (" +
                            quoted_names(names) + ")";
      if (!missing.empty()) message += "; missing: " + quoted_names(missing);
      if (!extra.empty()) message += "; unknown: " + quoted_names(extra);
      throw InvalidArgument(message);
    }
    std::vector<Float64Array> columns;
    columns.reserve(width);
    for (const std::string& name : names) {
      columns.push_back(float_values(mapping[py::str(name)]));
      const auto n = static_cast<std::size_t>(columns.back().size());
      if (columns.size() == 1) {
        rows_ = n;
      } else if (n != rows_) {
        throw InvalidArgument("values mapping: column '" + name + "' has " + std::to_string(n) +
                              " values, '" + names[0] + "' " + std::to_string(rows_));
      }
    }
    block_.resize(rows_ * width);
    for (std::size_t c = 0; c < width; ++c) {
      const double* column = columns[c].data();
      for (std::size_t i = 0; i < rows_; ++i) block_[i * width + c] = column[i];
    }
    data_ = block_.data();
  }

  Float64Array array_;
  std::vector<double> block_;
  const double* data_ = nullptr;
  std::size_t rows_ = 0;
};

// None (one unnamed column) or a list/tuple of distinct non-empty str.
inline std::vector<std::string> value_names_arg(py::handle values) {
  std::vector<std::string> names;
  if (values.is_none()) return names;
  if (PyList_Check(values.ptr()) == 0 && PyTuple_Check(values.ptr()) == 0) {
    throw py::type_error("values must be None or a list of str (the value column names), not " +
                         type_name(values));
  }
  for (const py::handle name : values) {
    if (!PyUnicode_Check(name.ptr())) {
      throw py::type_error("values must be a list of str, got an item of type " + type_name(name));
    }
    names.push_back(name.cast<std::string>());
  }
  if (names.empty()) throw InvalidArgument("values must name at least one column (or be None)");
  return names;
}


}  // namespace streamstate::bindings
