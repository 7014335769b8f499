#include "core/result_columns.h"

#include <sys/mman.h>
#include <unistd.h>

#include <limits>
#include <new>

#include "core/errors.h"

namespace streamstate {

void GrowableBuffer::reserve(std::size_t bytes) {
  if (bytes <= capacity_) return;
  const long page_size = ::sysconf(_SC_PAGESIZE);
  const std::size_t page = page_size > 0 ? static_cast<std::size_t>(page_size) : 4096;
  const std::size_t want = (bytes + page - 1) / page * page;
  void* p = nullptr;
  if (data_ == nullptr) {
    p = ::mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  } else {
    // ThreadSanitizer does not intercept mremap, so pages it moves keep the shadow state of
    // their old address and a later mapping there looks like a race: TSan builds copy.
#if defined(__linux__) && !defined(__SANITIZE_THREAD__)
    p = ::mremap(data_, capacity_, want, MREMAP_MAYMOVE);
#else
    p = ::mmap(nullptr, want, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p != MAP_FAILED) {
      std::memcpy(p, data_, capacity_);
      ::munmap(data_, capacity_);
    }
#endif
  }
  if (p == MAP_FAILED) throw std::bad_alloc();
  data_ = static_cast<char*>(p);
  capacity_ = want;
}

void GrowableBuffer::free_memory(char* data, std::size_t capacity) noexcept {
  if (data != nullptr) ::munmap(data, capacity);
}

void ChunkedBytes::push_back(std::string_view key) {
  if (key.size() > std::numeric_limits<std::uint32_t>::max()) {
    throw InvalidArgument("spilling aggregator: a key longer than 4 GiB");
  }
  constexpr std::size_t kChunkBytes = std::size_t{1} << 16;
  if (chunks_.empty() || chunks_.back().size() + key.size() > chunks_.back().capacity()) {
    chunks_.emplace_back();
    chunks_.back().reserve(std::max(kChunkBytes, key.size()));
  }
  chunks_.back().append(key);
  lengths_.push_back(static_cast<std::uint32_t>(key.size()));
}

void ChunkedBytes::release() noexcept {
  std::vector<std::string>().swap(chunks_);
  lengths_.release();
}

void GroupColumns::emit_stats(const Moments& m) {
  count.push_back(m.count);
  sum.push_back(m.sum);
  min.push_back(m.min);
  max.push_back(m.max);
  mean.push_back(m.mean());
  var.push_back(m.var());
  std.push_back(m.stddev());
}

}  // namespace streamstate
