// Byte-string key columns read in place: every binding that takes a column of
// key_type='bytes' keys (fold, partition_batch, the spilling aggregator) reads it here, so
// each representation has one reader and one set of rules.
//
// Accepted, without a Python object per key where the input has none:
//   numpy 'S' arrays   fixed width, viewed in place; trailing NULs are padding, not key;
//   numpy 'U' arrays   UTF-32, encoded once to UTF-8 (trailing NULs likewise dropped);
//   Arrow arrays       string, large_string, binary, large_binary, string_view,
//                      binary_view: anything with __arrow_c_array__ (the Arrow C data
//                      interface; pyarrow arrays have it), offsets and data read in place;
//   sequences          lists, tuples, object arrays of bytes / str (buffers.h's rules).
// A null key (Arrow validity bit, or None in a sequence) raises ValueError.
//
// at(i) and chunk_views() touch no Python object: they may run with the GIL released for
// as long as this object lives (it holds every buffer it views).
#pragma once

#include "bindings/arrays.h"
#include "bindings/buffers.h"
#include "bindings/prelude.h"

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace streamstate::bindings {

namespace arrow_abi {
// The Arrow C data interface's two structs, as its specification fixes them (an ABI).
struct ArrowSchema {
  const char* format;
  const char* name;
  const char* metadata;
  std::int64_t flags;
  std::int64_t n_children;
  ArrowSchema** children;
  ArrowSchema* dictionary;
  void (*release)(ArrowSchema*);
  void* private_data;
};
struct ArrowArray {
  std::int64_t length;
  std::int64_t null_count;
  std::int64_t offset;
  std::int64_t n_buffers;
  std::int64_t n_children;
  const void** buffers;
  ArrowArray** children;
  ArrowArray* dictionary;
  void (*release)(ArrowArray*);
  void* private_data;
};
// A string/binary view: length, then either the bytes inline (<= 12) or a 4-byte prefix,
// the data buffer's index and the offset in it.
struct ArrowView {
  std::int32_t length;
  char prefix_or_inline[4];
  std::int32_t buffer_index;
  std::int32_t offset;
};
static_assert(sizeof(ArrowView) == 16);
}  // namespace arrow_abi

// What a key argument must be, for TypeErrors.
inline constexpr const char* kByteKeyTypes =
    "a numpy 'S' or 'U' array, a pyarrow string/binary array (or any object with "
    "__arrow_c_array__), or a sequence of bytes / str";

class ByteKeyColumn {
 public:
  // Whether `keys` is a column this class reads natively (numpy S/U or an Arrow array);
  // sequences and object arrays are accepted too, but are not recognisable from the type.
  [[nodiscard]] static bool is_native(py::handle keys) {
    if (py::hasattr(keys, "__arrow_c_array__")) return true;
    if (!py::isinstance<py::array>(keys)) return false;
    const char kind = py::reinterpret_borrow<py::array>(keys).dtype().kind();
    return kind == 'S' || kind == 'U';
  }

  ByteKeyColumn(py::handle keys, const char* what) {
    if (py::hasattr(keys, "__arrow_c_array__")) {
      read_arrow(keys, what);
    } else if (py::isinstance<py::array>(keys) &&
               (py::reinterpret_borrow<py::array>(keys).dtype().kind() == 'S' ||
                py::reinterpret_borrow<py::array>(keys).dtype().kind() == 'U')) {
      read_fixed_width(py::reinterpret_borrow<py::array>(keys), what);
    } else {
      read_sequence(keys, what);
    }
  }

  [[nodiscard]] std::size_t size() const noexcept { return size_; }

  // Key i (i < size()).
  [[nodiscard]] std::string_view at(std::size_t i) const noexcept {
    switch (layout_) {
      case Layout::kFixedWidth: {
        const char* p = base_ + static_cast<std::ptrdiff_t>(i) * stride_;
        std::size_t n = width_;
        while (n > 0 && p[n - 1] == '\0') --n;
        return {p, n};
      }
      case Layout::kOffsets32: {
        const auto* o = static_cast<const std::int32_t*>(offsets_) + i;
        return {base_ + o[0], static_cast<std::size_t>(o[1] - o[0])};
      }
      case Layout::kOffsets64: {
        const auto* o = static_cast<const std::int64_t*>(offsets_) + i;
        return {base_ + o[0], static_cast<std::size_t>(o[1] - o[0])};
      }
      case Layout::kViews: {
        const auto& v = static_cast<const arrow_abi::ArrowView*>(offsets_)[i];
        const auto n = static_cast<std::size_t>(v.length);
        if (n <= 12) return {reinterpret_cast<const char*>(&v) + 4, n};
        return {data_buffers_[static_cast<std::size_t>(v.buffer_index)] + v.offset, n};
      }
      case Layout::kSequence:
        return sequence_->views()[i];
    }
    return {};
  }

  // The views of keys [begin, end): in place for a sequence, else written to `scratch`.
  [[nodiscard]] const std::string_view* chunk_views(std::size_t begin, std::size_t end,
                                                    std::vector<std::string_view>& scratch) const {
    if (layout_ == Layout::kSequence) return sequence_->views().data() + begin;
    scratch.clear();
    for (std::size_t i = begin; i < end; ++i) scratch.push_back(at(i));
    return scratch.data();
  }

  // Bytes of key data (for deciding whether releasing the GIL pays).
  [[nodiscard]] std::size_t total_bytes() const noexcept { return total_bytes_; }

 private:
  enum class Layout { kFixedWidth, kOffsets32, kOffsets64, kViews, kSequence };

  void read_fixed_width(py::array array, const char* what) {
    if (array.ndim() != 1) {
      throw InvalidArgument(std::string(what) + " must be one-dimensional, got " +
                            std::to_string(array.ndim()) + " dimensions");
    }
    if (array.dtype().kind() == 'U') {
      encode_utf32(array, what);
      return;
    }
    layout_ = Layout::kFixedWidth;
    owner_ = array;
    size_ = static_cast<std::size_t>(array.shape(0));
    width_ = static_cast<std::size_t>(array.itemsize());
    stride_ = array.strides(0);
    base_ = static_cast<const char*>(array.data());
    total_bytes_ = size_ * width_;
  }

  // numpy's U is UTF-32 in the array's byte order; keys are its UTF-8, encoded here once.
  void encode_utf32(py::array array, const char* what) {
    const bool swap = array.dtype().attr("byteorder").cast<std::string>() == ">";
    const std::size_t n = static_cast<std::size_t>(array.shape(0));
    const std::size_t chars = static_cast<std::size_t>(array.itemsize()) / 4;
    const py::ssize_t stride = array.strides(0);
    const char* base = static_cast<const char*>(array.data());
    auto offsets = std::make_shared<std::vector<std::int64_t>>();
    auto bytes = std::make_shared<std::string>();
    offsets->reserve(n + 1);
    offsets->push_back(0);
    std::size_t bad_row = n;
    {
      const MaybeReleaseGil release(n * chars * 4);  // reads the array, writes private memory
      for (std::size_t i = 0; i < n && bad_row == n; ++i) {
        const char* row = base + static_cast<std::ptrdiff_t>(i) * stride;
        std::size_t len = chars;
        const auto code_at = [&](std::size_t c) {
          std::uint32_t u;
          std::memcpy(&u, row + 4 * c, 4);
          return swap ? __builtin_bswap32(u) : u;
        };
        while (len > 0 && code_at(len - 1) == 0) --len;
        for (std::size_t c = 0; c < len; ++c) {
          const std::uint32_t u = code_at(c);
          if (u < 0x80) {
            bytes->push_back(static_cast<char>(u));
          } else if (u < 0x800) {
            bytes->push_back(static_cast<char>(0xC0 | (u >> 6)));
            bytes->push_back(static_cast<char>(0x80 | (u & 0x3F)));
          } else if (u < 0x10000) {
            if (u >= 0xD800 && u <= 0xDFFF) {
              bad_row = i;
              break;
            }
            bytes->push_back(static_cast<char>(0xE0 | (u >> 12)));
            bytes->push_back(static_cast<char>(0x80 | ((u >> 6) & 0x3F)));
            bytes->push_back(static_cast<char>(0x80 | (u & 0x3F)));
          } else if (u < 0x110000) {
            bytes->push_back(static_cast<char>(0xF0 | (u >> 18)));
            bytes->push_back(static_cast<char>(0x80 | ((u >> 12) & 0x3F)));
            bytes->push_back(static_cast<char>(0x80 | ((u >> 6) & 0x3F)));
            bytes->push_back(static_cast<char>(0x80 | (u & 0x3F)));
          } else {
            bad_row = i;
            break;
          }
        }
        offsets->push_back(static_cast<std::int64_t>(bytes->size()));
      }
    }
    if (bad_row != n) {
      throw py::value_error(std::string(what) + "[" + std::to_string(bad_row) +
                            "] is not valid Unicode (a surrogate or a code point beyond "
                            "U+10FFFF): it has no UTF-8 form");
    }
    layout_ = Layout::kOffsets64;
    size_ = n;
    base_ = bytes->data();
    offsets_ = offsets->data();
    total_bytes_ = bytes->size();
    encoded_bytes_ = std::move(bytes);
    encoded_offsets_ = std::move(offsets);
  }

  void read_sequence(py::handle keys, const char* what) {
    if (py::isinstance<py::array>(keys)) {
      const auto array = py::reinterpret_borrow<py::array>(keys);
      if (array.dtype().kind() != 'O' && array.size() > 0) {
        const std::string dtype = py::str(array.dtype()).cast<std::string>();
        throw py::type_error(std::string(what) + "[0]: the item at index 0 must be bytes or str, "
                             "not a numpy " + dtype + " (" + what + " must be " + kByteKeyTypes +
                             " for key_type='bytes', not a numpy array of dtype " + dtype + ")");
      }
      if (array.ndim() != 1) {
        throw InvalidArgument(std::string(what) + " must be one-dimensional, got " +
                              std::to_string(array.ndim()) + " dimensions");
      }
    } else if (PyUnicode_Check(keys.ptr()) || PyBytes_Check(keys.ptr())) {
      throw py::type_error(std::string(what) + " must be " + kByteKeyTypes +
                           " for key_type='bytes', not a single " + type_name(keys));
    } else if (PySequence_Check(keys.ptr()) == 0) {
      throw py::type_error(std::string(what) + " must be " + kByteKeyTypes +
                           " for key_type='bytes', not " + type_name(keys));
    }
    layout_ = Layout::kSequence;
    sequence_ = std::make_unique<PinnedByteStrings>(keys, ByteItems::kKeysOrText, what);
    size_ = sequence_->size();
    total_bytes_ = sequence_->total_bytes();
  }

  void read_arrow(py::handle keys, const char* what) {
    const py::object pair = keys.attr("__arrow_c_array__")();
    if (!py::isinstance<py::tuple>(pair) || py::len(pair) != 2) {
      throw py::type_error(std::string(what) + ": __arrow_c_array__() must return a "
                           "(schema, array) pair of capsules");
    }
    arrow_schema_ = pair[py::int_(0)];
    arrow_array_ = pair[py::int_(1)];
    auto* schema = static_cast<arrow_abi::ArrowSchema*>(
        PyCapsule_GetPointer(arrow_schema_.ptr(), "arrow_schema"));
    if (schema == nullptr) throw py::error_already_set();
    auto* array = static_cast<arrow_abi::ArrowArray*>(
        PyCapsule_GetPointer(arrow_array_.ptr(), "arrow_array"));
    if (array == nullptr) throw py::error_already_set();
    const std::string format = schema->format == nullptr ? "" : schema->format;
    std::int64_t buffers_needed = 3;
    if (format == "u" || format == "z") {
      layout_ = Layout::kOffsets32;
    } else if (format == "U" || format == "Z") {
      layout_ = Layout::kOffsets64;
    } else if (format == "vu" || format == "vz") {
      layout_ = Layout::kViews;
      buffers_needed = 3;  // validity, views, variadic sizes (+ data buffers between)
    } else {
      throw py::type_error(std::string(what) + " must be " + kByteKeyTypes +
                           " for key_type='bytes', got an Arrow array of format '" + format +
                           "' (string, large_string, binary, large_binary, string_view or "
                           "binary_view are accepted)");
    }
    if (array->n_buffers < buffers_needed || array->length < 0 || array->offset < 0) {
      throw CorruptDataError(std::string(what) + ": malformed Arrow array (buffers/length)");
    }
    size_ = static_cast<std::size_t>(array->length);
    const auto offset = static_cast<std::size_t>(array->offset);
    check_no_nulls(*array, what);
    if (layout_ == Layout::kViews) {
      read_arrow_views(*array, offset, what);
      return;
    }
    base_ = static_cast<const char*>(array->buffers[2]);
    if (layout_ == Layout::kOffsets32) {
      const auto* o = static_cast<const std::int32_t*>(array->buffers[1]);
      offsets_ = o == nullptr ? nullptr : o + offset;
      check_offsets(static_cast<const std::int32_t*>(offsets_), what);
    } else {
      const auto* o = static_cast<const std::int64_t*>(array->buffers[1]);
      offsets_ = o == nullptr ? nullptr : o + offset;
      check_offsets(static_cast<const std::int64_t*>(offsets_), what);
    }
  }

  void read_arrow_views(const arrow_abi::ArrowArray& array, std::size_t offset, const char* what) {
    const auto* views = static_cast<const arrow_abi::ArrowView*>(array.buffers[1]);
    if (views == nullptr && size_ > 0) {
      throw CorruptDataError(std::string(what) + ": malformed Arrow view array (no views)");
    }
    offsets_ = views == nullptr ? nullptr : views + offset;
    const auto n_data = static_cast<std::size_t>(array.n_buffers - 3);
    const auto* sizes = static_cast<const std::int64_t*>(array.buffers[array.n_buffers - 1]);
    for (std::size_t b = 0; b < n_data; ++b) {
      data_buffers_.push_back(static_cast<const char*>(array.buffers[2 + b]));
    }
    // Every out-of-line view must lie inside its data buffer: checked once, here.
    const auto* v = static_cast<const arrow_abi::ArrowView*>(offsets_);
    for (std::size_t i = 0; i < size_; ++i) {
      const std::int32_t len = v[i].length;
      bool ok = len >= 0;
      if (ok && len > 12) {
        const auto b = static_cast<std::size_t>(v[i].buffer_index);
        ok = v[i].buffer_index >= 0 && b < n_data && v[i].offset >= 0 && sizes != nullptr &&
             static_cast<std::int64_t>(v[i].offset) + len <= sizes[b];
      }
      if (!ok) {
        throw CorruptDataError(std::string(what) + ": malformed Arrow view at index " +
                               std::to_string(i));
      }
      total_bytes_ += static_cast<std::size_t>(len);
    }
  }

  void check_no_nulls(const arrow_abi::ArrowArray& array, const char* what) const {
    const auto* validity = static_cast<const std::uint8_t*>(array.buffers[0]);
    if (array.null_count == 0 || validity == nullptr) return;
    const auto offset = static_cast<std::size_t>(array.offset);
    for (std::size_t i = 0; i < size_; ++i) {
      const std::size_t bit = offset + i;
      if ((validity[bit >> 3] >> (bit & 7) & 1) == 0) {
        throw py::value_error(std::string(what) + "[" + std::to_string(i) +
                              "] is null: keys cannot be null (drop or fill nulls first)");
      }
    }
  }

  template <class Offset>
  void check_offsets(const Offset* o, const char* what) {
    if (size_ == 0) return;
    if (o == nullptr || (base_ == nullptr && o[size_] != o[0])) {
      throw CorruptDataError(std::string(what) + ": malformed Arrow array (no offsets or data)");
    }
    if (o[0] < 0) throw CorruptDataError(std::string(what) + ": negative Arrow offset");
    for (std::size_t i = 0; i < size_; ++i) {
      if (o[i + 1] < o[i]) {
        throw CorruptDataError(std::string(what) + ": Arrow offsets decrease at index " +
                               std::to_string(i));
      }
    }
    total_bytes_ = static_cast<std::size_t>(o[size_] - o[0]);
  }

  Layout layout_ = Layout::kSequence;
  std::size_t size_ = 0;
  std::size_t total_bytes_ = 0;
  // kFixedWidth: row i at base_ + i * stride_, width_ bytes. kOffsets*: key i is
  // base_[offsets_[i], offsets_[i + 1]). kViews: offsets_ points at the views.
  const char* base_ = nullptr;
  const void* offsets_ = nullptr;
  std::size_t width_ = 0;
  py::ssize_t stride_ = 0;
  std::vector<const char*> data_buffers_;
  // What keeps the viewed memory alive.
  py::object owner_;
  py::object arrow_schema_;
  py::object arrow_array_;
  std::shared_ptr<std::string> encoded_bytes_;
  std::shared_ptr<std::vector<std::int64_t>> encoded_offsets_;
  std::unique_ptr<PinnedByteStrings> sequence_;
};

}  // namespace streamstate::bindings
