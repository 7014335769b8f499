// Result columns that grow without ever holding two copies: what the spilling aggregator's
// drain appends finished groups to, and what the bindings hand to numpy without a copy.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/stats.h"

namespace streamstate {

// Anonymous memory for result columns that grows in place: on Linux mremap moves pages
// instead of copying them, so a column of N values never costs more than N values of RSS
// (a std::vector briefly holds 1.5-3x while it reallocates, and glibc often keeps the
// freed copy). The memory can be handed over to a numpy array without a copy.
class GrowableBuffer {
 public:
  GrowableBuffer() = default;
  ~GrowableBuffer() { free_memory(data_, capacity_); }
  GrowableBuffer(GrowableBuffer&& other) noexcept
      : data_(std::exchange(other.data_, nullptr)), capacity_(std::exchange(other.capacity_, 0)) {}
  GrowableBuffer& operator=(GrowableBuffer&& other) noexcept {
    if (this != &other) {
      free_memory(data_, capacity_);
      data_ = std::exchange(other.data_, nullptr);
      capacity_ = std::exchange(other.capacity_, 0);
    }
    return *this;
  }
  GrowableBuffer(const GrowableBuffer&) = delete;
  GrowableBuffer& operator=(const GrowableBuffer&) = delete;

  // Makes capacity() >= bytes, keeping the contents; throws std::bad_alloc.
  void reserve(std::size_t bytes);
  [[nodiscard]] char* data() const noexcept { return data_; }
  [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }
  // Gives up ownership: the caller frees with free_memory(pointer, capacity()).
  [[nodiscard]] char* release() noexcept {
    capacity_ = 0;
    return std::exchange(data_, nullptr);
  }
  static void free_memory(char* data, std::size_t capacity) noexcept;

 private:
  char* data_ = nullptr;
  std::size_t capacity_ = 0;
};

// An append-only column of trivially copyable values in a GrowableBuffer.
template <class T>
class ResultColumn {
 public:
  void push_back(const T& v) {
    if ((size_ + 1) * sizeof(T) > buffer_.capacity()) {
      buffer_.reserve(std::max<std::size_t>(2 * buffer_.capacity(), 64 * 1024));
    }
    std::memcpy(buffer_.data() + size_ * sizeof(T), &v, sizeof(T));
    ++size_;
  }
  [[nodiscard]] std::size_t size() const noexcept { return size_; }
  [[nodiscard]] const T* data() const noexcept {
    return reinterpret_cast<const T*>(buffer_.data());
  }
  // Appends other's values and frees other (grows in place, so only other is copied).
  void append(ResultColumn& other) {
    if (other.size_ == 0) return;
    buffer_.reserve((size_ + other.size_) * sizeof(T));
    std::memcpy(buffer_.data() + size_ * sizeof(T), other.buffer_.data(), other.size_ * sizeof(T));
    size_ += other.size_;
    other = ResultColumn{};
  }
  [[nodiscard]] GrowableBuffer& buffer() noexcept { return buffer_; }
  void release() noexcept { *this = ResultColumn{}; }

 private:
  GrowableBuffer buffer_;
  std::size_t size_ = 0;
};

// Byte-string keys stored back to back in chunks (a key never straddles two chunks).
class ChunkedBytes {
 public:
  void push_back(std::string_view key);
  [[nodiscard]] std::size_t size() const noexcept { return lengths_.size(); }
  // Calls fn(std::string_view) for every key in order.
  template <class Fn>
  void for_each(Fn&& fn) const {
    std::size_t chunk = 0;
    std::size_t offset = 0;
    const std::uint32_t* len = lengths_.data();
    for (std::size_t i = 0; i < lengths_.size(); ++i) {
      if (offset + len[i] > chunks_[chunk].size()) {
        ++chunk;
        offset = 0;
      }
      fn(std::string_view(chunks_[chunk].data() + offset, len[i]));
      offset += len[i];
    }
  }
  void release() noexcept;

 private:
  std::vector<std::string> chunks_;
  ResultColumn<std::uint32_t> lengths_;
};

// Finished groups (key and statistics) as growable columns, appended as partitions are
// drained. (NumericAggregateStore fills preallocated StatArrays by index instead.)
struct GroupColumns {
  ResultColumn<std::int64_t> int_keys;  // int64 aggregators
  ChunkedBytes bytes_keys;              // bytes aggregators
  ResultColumn<std::uint64_t> count;
  ResultColumn<double> sum, min, max, mean, var, std;

  void emit(std::int64_t key, const Moments& m) {
    int_keys.push_back(key);
    emit_stats(m);
  }
  void emit(std::string_view key, const Moments& m) {
    bytes_keys.push_back(key);
    emit_stats(m);
  }
  [[nodiscard]] std::size_t size() const noexcept { return count.size(); }

 private:
  void emit_stats(const Moments& m);
};

}  // namespace streamstate
