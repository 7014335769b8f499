#include "core/hash.h"

#include <chrono>
#include <random>

namespace streamstate {

std::uint64_t hash_detail::draw_process_seed() noexcept {
  try {
    std::random_device device;
    return (static_cast<std::uint64_t>(device()) << 32) ^ device();
  } catch (...) {
    // No entropy source: the clock and this module's load address still vary per process.
    static const int anchor = 0;
    return static_cast<std::uint64_t>(
               std::chrono::steady_clock::now().time_since_epoch().count()) ^
           reinterpret_cast<std::uintptr_t>(&anchor);
  }
}

}  // namespace streamstate
