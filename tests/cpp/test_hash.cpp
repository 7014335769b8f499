// C++ unit tests for the core's one hash (hash.h) and its huge-page memory
// (huge_page_allocator.h), which every table builds on.
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "core/flat_table.h"
#include "core/hash.h"
#include "core/huge_page_allocator.h"
#include "core/stats.h"

#include "check.h"

namespace {

using streamstate::test::check_summary;

void test_stable_hash() {
  using streamstate::hash_bytes;
  using streamstate::hash_u64;
  // The stable seed is the murmur3 finalizer itself: the same in every process, forever.
  CHECK(hash_u64(0) == 0);
  CHECK(hash_u64(1) == 0xb456bcfc34c2cb2cULL);
  CHECK(streamstate::mix64(1) == hash_u64(1));
  CHECK(hash_bytes("") == hash_bytes(std::string_view{}));
  // Every length class of the tail (0, 1-3, 4-7, 8-16, > 16 bytes) sees every byte.
  const std::string base = "abcdefghijklmnopqrstuvwxyz0123456789";
  for (std::size_t n = 1; n <= base.size(); ++n) {
    const std::string key = base.substr(0, n);
    for (std::size_t i = 0; i < n; ++i) {
      std::string flipped = key;
      flipped[i] = static_cast<char>(flipped[i] ^ 1);
      CHECK(hash_bytes(flipped) != hash_bytes(key));
    }
    CHECK(hash_bytes(key) != hash_bytes(key + std::string(1, '\0')));
  }
}

void test_seeds() {
  using streamstate::hash_bytes;
  using streamstate::hash_u64;
  const std::uint64_t seed = streamstate::process_seed();
  CHECK(seed == streamstate::process_seed());  // drawn once per process
  CHECK(hash_bytes("key", seed) == hash_bytes("key", seed));
  CHECK(hash_bytes("key", 1) != hash_bytes("key", 2));
  CHECK(hash_u64(42, streamstate::nth_seed(0)) != hash_u64(42, streamstate::nth_seed(1)));
}

// Sequential keys spread over the low bits (slot choice) and the top 7 (shard choice).
void test_spread() {
  constexpr std::size_t kKeys = 1 << 16;
  constexpr std::size_t kBuckets = 128;
  std::vector<std::size_t> low(kBuckets);
  std::vector<std::size_t> high(kBuckets);
  std::vector<std::size_t> bytes_low(kBuckets);
  for (std::size_t i = 0; i < kKeys; ++i) {
    const std::uint64_t h = streamstate::hash_u64(i);
    ++low[h & (kBuckets - 1)];
    ++high[h >> 57];
    ++bytes_low[streamstate::hash_bytes("user:" + std::to_string(i)) & (kBuckets - 1)];
  }
  const std::size_t expected = kKeys / kBuckets;
  for (std::size_t b = 0; b < kBuckets; ++b) {
    CHECK(low[b] > expected / 2 && low[b] < 2 * expected);
    CHECK(high[b] > expected / 2 && high[b] < 2 * expected);
    CHECK(bytes_low[b] > expected / 2 && bytes_low[b] < 2 * expected);
  }
}

void test_huge_page_memory() {
  using streamstate::huge_page_allocation_bytes;
  using streamstate::kHugePageBytes;
  CHECK(huge_page_allocation_bytes(100) == 100);
  CHECK(huge_page_allocation_bytes(kHugePageBytes) == kHugePageBytes);
  CHECK(huge_page_allocation_bytes(kHugePageBytes + 1) == 2 * kHugePageBytes);
  // Large blocks are huge-page aligned; small over-aligned ones keep their alignment.
  streamstate::HugePageBuffer<char> big(kHugePageBytes + 3);
  CHECK(reinterpret_cast<std::uintptr_t>(big.data()) % kHugePageBytes == 0);
  std::memset(big.data(), 7, big.size());
  CHECK(big[big.size() - 1] == 7);
  struct alignas(64) Wide {
    char bytes[64];
  };
  streamstate::HugePageVector<Wide> wide(3);
  CHECK(reinterpret_cast<std::uintptr_t>(wide.data()) % 64 == 0);
  streamstate::HugePageBuffer<char> moved(std::move(big));
  CHECK(moved.size() == kHugePageBytes + 3 && big.data() == nullptr);
}

// A budget charges reserved_bytes() before a reservation: it must be what memory_bytes()
// then reports.
void test_reserved_bytes() {
  using streamstate::Moments;
  for (const std::size_t n : {std::size_t{12}, std::size_t{1000}, std::size_t{200000}}) {
    streamstate::Int64FlatTable<Moments> ints;
    ints.reserve(n);
    CHECK(ints.memory_bytes() - sizeof(ints) == ints.reserved_bytes(n, 0));
    streamstate::BytesFlatTable<Moments> bytes;
    bytes.reserve(n, 16 * n);
    CHECK(bytes.memory_bytes() - sizeof(bytes) == bytes.reserved_bytes(n, 16 * n));
  }
}

}  // namespace

int main() {
  test_stable_hash();
  test_seeds();
  test_spread();
  test_huge_page_memory();
  test_reserved_bytes();
  return check_summary("test_hash");
}
