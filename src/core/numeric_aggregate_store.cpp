#include "core/numeric_aggregate_store.h"
#include "core/parallel.h"

#include <algorithm>
#include <bit>
#include <string>
#include <type_traits>
#include <utility>

#include <oneapi/tbb/blocked_range.h>

#include "core/byte_io.h"
#include "core/errors.h"
#include "core/record_codec.h"

namespace streamstate {
namespace {

// Snapshot layout inside the record container (kind kNumericAggregateStore):
//   "streamstate.numeric_aggregate_store": u32 layout version, u32 num_partitions,
//                                          u8 key type (0 int64, 1 bytes)
//   "shared" (any number of chunks): u32 n, n x (key, u32 k, k x (u32 partition, Moments))
//   "local" + u32 partition (any number of chunks per partition): u32 n, n x (key, Moments)
// A key is 8 bytes LE for int64 keys, u32 length + bytes for bytes keys. Chunks keep each
// record far below the container's 4 GiB field limit.
constexpr std::string_view kHeaderKey = "streamstate.numeric_aggregate_store";
constexpr std::string_view kSharedKey = "shared";
constexpr std::string_view kLocalPrefix = "local";
constexpr std::uint32_t kLayoutVersion = 1;
constexpr std::uint32_t kMaxPartitions = 65536;
constexpr std::size_t kChunkEntries = 1 << 16;

// Sorts by bits [32, 32 + bits) (LSD radix, 11 bits a pass; std::sort for small inputs).
void sort_by_high_word(std::vector<std::uint64_t>& v, unsigned bits) {
  if (v.size() < 2048) {
    std::sort(v.begin(), v.end());
    return;
  }
  constexpr unsigned kDigit = 11;
  constexpr std::size_t kBins = std::size_t{1} << kDigit;
  std::vector<std::uint64_t> tmp(v.size());
  std::vector<std::size_t> count(kBins);
  for (unsigned shift = 32; shift < 32 + bits; shift += kDigit) {
    std::fill(count.begin(), count.end(), 0);
    for (const std::uint64_t x : v) ++count[(x >> shift) & (kBins - 1)];
    std::size_t sum = 0;
    for (std::size_t& c : count) {
      const std::size_t n = c;
      c = sum;
      sum += n;
    }
    for (const std::uint64_t x : v) tmp[count[(x >> shift) & (kBins - 1)]++] = x;
    v.swap(tmp);
  }
}

[[noreturn]] void corrupt(const std::string& what) {
  throw CorruptDataError("numeric aggregate store snapshot: " + what);
}

// Reads a chunk's entry count and rejects counts the chunk cannot possibly hold, so a
// forged count never drives a giant reservation.
std::uint32_t chunk_count(ByteReader& in, std::size_t min_entry_bytes) {
  const std::uint32_t n = in.u32();
  if (n > in.remaining() / min_entry_bytes) corrupt("chunk entry count larger than its bytes");
  return n;
}

}  // namespace

template <class K>
NumericAggregateStore<K>::NumericAggregateStore(std::uint32_t num_partitions, NanPolicy policy)
    : policy_(policy) {
  if (num_partitions == 0 || num_partitions > kMaxPartitions) {
    throw InvalidArgument("num_partitions must be between 1 and 65536, got " +
                          std::to_string(num_partitions));
  }
  partitions_.reserve(num_partitions);
  for (std::uint32_t i = 0; i < num_partitions; ++i) {
    partitions_.push_back(std::make_unique<Partition>());
  }
}

template <class K>
void NumericAggregateStore<K>::check_partition(std::uint32_t partition_id) const {
  if (partition_id >= partitions_.size()) {
    throw InvalidArgument("partition_id " + std::to_string(partition_id) + " out of range [0, " +
                          std::to_string(partitions_.size()) + ")");
  }
}

template <class K>
typename NumericAggregateStore<K>::Partition& NumericAggregateStore<K>::partition(
    std::uint32_t partition_id) {
  check_partition(partition_id);
  return *partitions_[partition_id];
}

template <class K>
const typename NumericAggregateStore<K>::Partition& NumericAggregateStore<K>::partition(
    std::uint32_t partition_id) const {
  check_partition(partition_id);
  return *partitions_[partition_id];
}

template <class K>
void NumericAggregateStore<K>::fold(std::uint32_t partition_id, const View* keys,
                                    const double* values, std::size_t n) {
  Partition& p = partition(partition_id);
  const std::lock_guard<std::mutex> lock(p.mutex);
  p.local.fold(keys, values, n, policy_);
}

template <class K>
void NumericAggregateStore<K>::Slots::put(std::uint32_t partition_id, const Moments& m) {
  Slot* slots = data();
  std::uint32_t at = 0;
  while (at < size_ && slots[at].partition < partition_id) ++at;
  if (at < size_ && slots[at].partition == partition_id) {
    slots[at].partial = m;
    return;
  }
  if (size_ == capacity_) {
    const std::uint32_t grown = capacity_ * 2;
    auto bigger = std::make_unique<Slot[]>(grown);
    std::copy(slots, slots + size_, bigger.get());
    heap_ = std::move(bigger);
    capacity_ = grown;
    slots = heap_.get();
  }
  std::copy_backward(slots + at, slots + size_, slots + size_ + 1);
  slots[at] = Slot{partition_id, m};
  ++size_;
}

template <class K>
Moments NumericAggregateStore<K>::merged(const Slots& slots) noexcept {
  Moments out;
  for (const Slot& s : slots) out.merge(s.partial);
  return out;
}

template <class K>
void NumericAggregateStore<K>::reserve_for(Partition& p) {
  std::size_t pending = 0;
  {
    const std::lock_guard<std::mutex> lock(p.mutex);
    pending = p.local.pending();
  }
  const std::size_t want = shared_.size() + pending;
  if (want <= shared_.bucket_count()) return;
  // TBB's rehash() must not run concurrently with anything else on the map.
  const ExclusiveEpoch epoch(epoch_);
  if (want > shared_.bucket_count()) shared_.rehash(want);
}

// Publishing walks the changed entries in the order of the shared map's buckets (a radix
// sort of bucket index, entry index): bucket heads are then read sequentially, a first
// publish allocates nodes in bucket order, and every later publish and result_columns()
// finds them in that order too. With a random order each insert costs several dependent
// cache misses; this turns most of them into streaming reads. The bucket array is grown
// beforehand so the order stays valid during the inserts.
template <class K>
std::size_t NumericAggregateStore<K>::publish(std::uint32_t partition_id) {
  Partition& p = partition(partition_id);
  reserve_for(p);
  const SharedEpoch epoch(epoch_);
  const std::lock_guard<std::mutex> lock(p.mutex);
  std::vector<std::uint64_t> order;  // (bucket << 32) | Ref
  p.local.collect_changes(order);
  const auto& local = p.local;
  const std::uint64_t buckets = shared_.bucket_count();
  const std::uint64_t mask = (buckets - 1) & 0xffffffffULL;
  for (std::uint64_t& o : order) {
    o |= (local.hash_at(static_cast<Ref>(o)) & mask) << 32;
  }
  sort_by_high_word(order, static_cast<unsigned>(std::bit_width(mask)));
  // Partitions publishing at the same time would otherwise walk the same buckets in
  // lockstep (same order, same keys) and fight over every bucket and node lock and cache
  // line; each starts instead at its own fraction of the bucket order and wraps around.
  const std::size_t n = order.size();
  // n < 2^32 (Refs are 32-bit) and partition_id < 2^16: no overflow.
  const std::size_t start = static_cast<std::size_t>(
      static_cast<std::uint64_t>(n) * partition_id / num_partitions());
  constexpr std::size_t kAhead = 8;
  for (std::size_t step = 0; step < n; ++step) {
    std::size_t j = start + step;
    if (j >= n) j -= n;
    std::size_t ahead = j + kAhead;
    if (ahead >= n) ahead -= n;
    if (kAhead < n) local.prefetch(static_cast<Ref>(order[ahead]));
    const auto ref = static_cast<Ref>(order[j]);
    typename SharedMap::accessor entry;
    shared_.insert(entry, local.key_at(ref));
    entry->second.put(partition_id, local.value_at(ref));
  }
  p.local.forget_changes();
  return order.size();
}

template <class K>
std::optional<Moments> NumericAggregateStore<K>::result(View key) const {
  const SharedEpoch epoch(epoch_);
  typename SharedMap::const_accessor entry;
  if (!shared_.find(entry, key)) return std::nullopt;
  return merged(entry->second);
}

template <class K>
void NumericAggregateStore<K>::result_columns(KeyColumn& keys, StatArrays& columns) const {
  const ExclusiveEpoch epoch(epoch_);
  // One serial walk collects the nodes (in bucket order, which publish made the memory
  // order too); the merge and the column writes then run in parallel by index, straight
  // into the output buffers.
  std::vector<const typename SharedMap::value_type*> items;
  items.reserve(shared_.size());
  for (const auto& item : shared_) items.push_back(&item);
  const std::size_t n = items.size();
  columns.allocate(n);
  if constexpr (std::is_same_v<K, Int64Keys>) keys.keys.resize(n);
  streamstate::parallel_for(tbb::blocked_range<std::size_t>(0, n, 16384),
                    [&](const tbb::blocked_range<std::size_t>& r) {
                      for (std::size_t i = r.begin(); i != r.end(); ++i) {
                        columns.set(i, merged(items[i]->second));
                        if constexpr (std::is_same_v<K, Int64Keys>) keys.keys[i] = items[i]->first;
                      }
                    });
  if constexpr (!std::is_same_v<K, Int64Keys>) {
    keys.reserve(n);
    for (const auto* item : items) keys.push_back(K::view_of(item->first));
  }
}

template <class K>
template <class Read>
auto NumericAggregateStore<K>::read_local(std::uint32_t partition_id, Read&& read) const {
  const Partition& p = partition(partition_id);
  const std::lock_guard<std::mutex> lock(p.mutex);
  return read(p.local);
}

template <class K>
std::size_t NumericAggregateStore<K>::partition_size(std::uint32_t partition_id) const {
  return read_local(partition_id, [](const Local& local) { return local.size(); });
}

template <class K>
std::size_t NumericAggregateStore<K>::partition_pending(std::uint32_t partition_id) const {
  return read_local(partition_id, [](const Local& local) { return local.pending(); });
}

template <class K>
std::size_t NumericAggregateStore<K>::partition_memory_bytes(std::uint32_t partition_id) const {
  return read_local(partition_id, [](const Local& local) { return local.memory_bytes(); });
}

template <class K>
std::string NumericAggregateStore<K>::snapshot() const {
  const ExclusiveEpoch epoch(epoch_);
  std::vector<std::unique_lock<std::mutex>> locks;
  locks.reserve(partitions_.size());
  for (const auto& p : partitions_) locks.emplace_back(p->mutex);

  RecordWriter writer(RecordKind::kNumericAggregateStore);
  std::string header;
  put_u32(header, kLayoutVersion);
  put_u32(header, num_partitions());
  header.push_back(static_cast<char>(K::kTag));
  writer.add(kHeaderKey, header);

  // Shared entries sorted by key, so equal contents give byte-identical snapshots.
  std::vector<const typename SharedMap::value_type*> items;
  items.reserve(shared_.size());
  for (const auto& item : shared_) items.push_back(&item);
  std::sort(items.begin(), items.end(), [](const auto* a, const auto* b) {
    return K::less(K::view_of(a->first), K::view_of(b->first));
  });
  std::string chunk;
  for (std::size_t start = 0; start < items.size(); start += kChunkEntries) {
    const std::size_t end = std::min(items.size(), start + kChunkEntries);
    chunk.clear();
    put_u32(chunk, static_cast<std::uint32_t>(end - start));
    for (std::size_t i = start; i < end; ++i) {
      K::encode(chunk, K::view_of(items[i]->first));
      put_u32(chunk, static_cast<std::uint32_t>(items[i]->second.size()));
      for (const Slot& s : items[i]->second) {
        put_u32(chunk, s.partition);
        s.partial.encode(chunk);
      }
    }
    writer.add(kSharedKey, chunk);
  }

  // Local tables shard by shard, each in insertion order: restoring rebuilds them in the
  // same order, so a restored store snapshots to the same bytes.
  std::string key;
  for (std::uint32_t pid = 0; pid < num_partitions(); ++pid) {
    key.assign(kLocalPrefix);
    put_u32(key, pid);
    for (std::size_t s = 0; s < Local::kShards; ++s) {
      const auto& table = partitions_[pid]->local.shard(s);
      for (std::size_t start = 0; start < table.size(); start += kChunkEntries) {
        const std::size_t end = std::min(table.size(), start + kChunkEntries);
        chunk.clear();
        put_u32(chunk, static_cast<std::uint32_t>(end - start));
        for (std::size_t i = start; i < end; ++i) {
          K::encode(chunk, table.key_at(i));
          table.value_at(i).encode(chunk);
        }
        writer.add(key, chunk);
      }
    }
  }
  return std::move(writer).finish();
}

template <class K>
void NumericAggregateStore<K>::restore(std::string_view data) {
  RecordReader reader(data);
  reader.expect_kind(RecordKind::kNumericAggregateStore);
  RecordView record;
  if (!reader.next(record) || record.key != kHeaderKey) corrupt("missing header record");
  {
    ByteReader header(record.value, "numeric aggregate store snapshot header");
    const std::uint32_t version = header.u32();
    (void)header.u32();  // the writer's num_partitions; partition ids are checked below
    const auto tag = static_cast<std::uint8_t>(header.take(1)[0]);
    if (version != kLayoutVersion) corrupt("unsupported layout version " + std::to_string(version));
    if (tag != K::kTag) {
      corrupt("written by a store with a different key_type (this store's is '" +
              std::string(K::kName) + "')");
    }
  }

  const std::uint32_t np = num_partitions();
  SharedMap fresh_shared;
  std::vector<std::vector<typename Local::Table>> fresh_local(np);
  for (auto& shards : fresh_local) shards.resize(Local::kShards);
  constexpr std::size_t kMinShared = 8 + 4 + 4 + Moments::kEncodedSize;  // int64 key lower bound
  constexpr std::size_t kMinLocal = 4 + Moments::kEncodedSize;
  while (reader.next(record)) {
    ByteReader in(record.value, "numeric aggregate store snapshot chunk");
    if (record.key == kSharedKey) {
      const std::uint32_t n = chunk_count(in, kMinShared - 4);
      for (std::uint32_t i = 0; i < n; ++i) {
        const View key = K::decode(in);
        const std::uint32_t k = in.u32();
        if (k == 0 || k > np) corrupt("a shared entry with " + std::to_string(k) + " partials");
        typename SharedMap::accessor entry;
        if (!fresh_shared.insert(entry, key)) corrupt("duplicate shared entry");
        Slots& slots = entry->second;
        std::uint32_t previous = 0;
        for (std::uint32_t j = 0; j < k; ++j) {
          const std::uint32_t pid = in.u32();
          if (pid >= np) {
            corrupt("partition id " + std::to_string(pid) + " >= num_partitions " +
                    std::to_string(np));
          }
          if (j > 0 && pid <= previous) {
            corrupt("shared partials not in strictly ascending partition order");
          }
          previous = pid;
          slots.put(pid, Moments::decode(in));
        }
      }
    } else if (record.key.size() == kLocalPrefix.size() + 4 &&
               record.key.substr(0, kLocalPrefix.size()) == kLocalPrefix) {
      const std::uint32_t pid = load_u32(record.key.data() + kLocalPrefix.size());
      if (pid >= np) {
        corrupt("partition id " + std::to_string(pid) + " >= num_partitions " +
                std::to_string(np));
      }
      auto& shards = fresh_local[pid];
      const std::uint32_t n = chunk_count(in, kMinLocal);
      for (std::uint32_t i = 0; i < n; ++i) {
        const View key = K::decode(in);
        const std::uint64_t hash = K::hash(key);
        auto& table = shards[Local::shard_of(hash)];
        if (table.size() >= Local::kMaxPerShard) corrupt("too many local entries in a shard");
        const auto [idx, inserted] = table.emplace(key, hash);
        if (!inserted) corrupt("duplicate local entry in partition " + std::to_string(pid));
        table.value_at(idx) = Moments::decode(in);
      }
    } else {
      corrupt("unknown record");
    }
    if (!in.at_end()) corrupt("trailing bytes in a chunk");
  }

  const ExclusiveEpoch epoch(epoch_);
  std::vector<std::unique_lock<std::mutex>> locks;
  locks.reserve(partitions_.size());
  for (const auto& p : partitions_) locks.emplace_back(p->mutex);
  shared_.swap(fresh_shared);
  for (std::uint32_t pid = 0; pid < np; ++pid) {
    partitions_[pid]->local.replace(std::move(fresh_local[pid]));
  }
}

template <class K>
std::size_t NumericAggregateStore<K>::memory_bytes() const {
  std::size_t total = sizeof(*this);
  for (std::uint32_t pid = 0; pid < num_partitions(); ++pid) total += partition_memory_bytes(pid);
  const ExclusiveEpoch epoch(epoch_);
  // TBB node: bucket link + per-node rw lock + the (key, slots) pair; plus each bucket's
  // pointer and lock. Slot vectors and long string keys count their heap capacity.
  constexpr std::size_t kNodeOverhead = 2 * sizeof(void*);
  constexpr std::size_t kBucket = 2 * sizeof(void*);
  total += shared_.bucket_count() * kBucket;
  for (const auto& item : shared_) {
    total += kNodeOverhead + sizeof(item) + item.second.heap_bytes();
    if constexpr (std::is_same_v<typename K::Key, std::string>) {
      if (item.first.capacity() > 15) total += item.first.capacity() + 1;
    }
  }
  return total;
}

template class NumericAggregateStore<Int64Keys>;
template class NumericAggregateStore<BytesKeys>;

}  // namespace streamstate
