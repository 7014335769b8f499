// The state backend's entry memory: bytes in chunks that never move, plus optionally one
// borrowed region (a restored snapshot used in place).
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string_view>
#include <utility>
#include <vector>

#include "core/huge_page_allocator.h"

namespace streamstate {

// The smallest chunk: small tables do not pay for a huge page.
inline constexpr std::size_t kMinArenaChunk = std::size_t{64} << 10;

// Entry bytes, in chunks that never move (slots hold pointers), plus optionally one
// external region: a restored snapshot used in place, kept alive by its owner and never
// written to. Each chunk is at least half the size of all before it, so there are few.
class ByteArena {
 public:
  ByteArena() = default;
  ByteArena(const ByteArena&) = delete;
  ByteArena& operator=(const ByteArena&) = delete;
  ByteArena(ByteArena&&) = delete;
  ByteArena& operator=(ByteArena&&) = delete;
  ~ByteArena() = default;

  // Room for `n` contiguous bytes; strong guarantee.
  void reserve(std::size_t n) {
    if (!chunks_.empty() && chunks_.back().data.size() - chunks_.back().size >= n) return;
    const std::size_t capacity = std::max({n, kMinArenaChunk, capacity_ / 2});
    HugePageBuffer<char> data(capacity);
    chunks_.reserve(chunks_.size() + 1);
    chunks_.push_back(Chunk{std::move(data), 0});
    capacity_ += capacity;
  }
  // Requires reserve(n) beforehand: where to write the next n bytes.
  [[nodiscard]] char* take(std::size_t n) noexcept {
    Chunk& chunk = chunks_.back();
    char* out = chunk.data.data() + chunk.size;
    chunk.size += n;
    return out;
  }
  // Undoes the last take(n) (for rollback).
  void give_back(std::size_t n) noexcept { chunks_.back().size -= n; }

  void adopt_external(std::string_view bytes, std::shared_ptr<const void> owner) noexcept {
    external_ = bytes;
    external_owner_ = std::move(owner);
  }
  [[nodiscard]] bool is_external(const char* p) const noexcept {
    const auto address = reinterpret_cast<std::uintptr_t>(p);
    const auto begin = reinterpret_cast<std::uintptr_t>(external_.data());
    return address >= begin && address < begin + external_.size();
  }
  [[nodiscard]] std::shared_ptr<const void> release_external() noexcept {
    external_ = {};
    return std::move(external_owner_);
  }

  void swap(ByteArena& other) noexcept {
    chunks_.swap(other.chunks_);
    std::swap(capacity_, other.capacity_);
    std::swap(external_, other.external_);
    external_owner_.swap(other.external_owner_);
  }

 private:
  struct Chunk {
    HugePageBuffer<char> data;
    std::size_t size;  // bytes taken from the front of data
  };
  std::vector<Chunk> chunks_;
  std::size_t capacity_ = 0;
  std::string_view external_;
  std::shared_ptr<const void> external_owner_;
};

}  // namespace streamstate
