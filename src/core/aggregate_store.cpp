#include "core/aggregate_store.h"

#include <algorithm>
#include <string>

#include "core/byte_io.h"
#include "core/errors.h"
#include "core/record_codec.h"

namespace streamstate {
namespace {

// Snapshot layout inside the record container (kind kAggregateStore):
//   record 0: key "streamstate.aggregate_store", value u32 layout version, u32 num_partitions
//   then one record per entry: key = group bytes + u32 LE partition id, value = partial.
constexpr std::string_view kHeaderKey = "streamstate.aggregate_store";
constexpr std::uint32_t kLayoutVersion = 1;
constexpr std::uint32_t kMaxPartitions = 65536;

}  // namespace

AggregateStore::AggregateStore(std::uint32_t num_partitions) : num_partitions_(num_partitions) {
  if (num_partitions == 0 || num_partitions > kMaxPartitions) {
    throw InvalidArgument("num_partitions must be between 1 and 65536, got " +
                          std::to_string(num_partitions));
  }
}

void AggregateStore::check_partition(std::uint32_t partition_id) const {
  if (partition_id >= num_partitions_) {
    throw InvalidArgument("partition_id " + std::to_string(partition_id) +
                          " out of range [0, " + std::to_string(num_partitions_) + ")");
  }
}

void AggregateStore::publish_locked(std::string_view group_key, std::uint32_t partition_id,
                                    std::string_view partial) {
  EntryMap::accessor entry;
  entries_.insert(entry, EntryKeyView{group_key, partition_id});
  entry->second.assign(partial);
}

void AggregateStore::publish(std::string_view group_key, std::uint32_t partition_id,
                             std::string_view partial) {
  check_partition(partition_id);
  const SharedEpoch epoch(epoch_);
  publish_locked(group_key, partition_id, partial);
}

void AggregateStore::reserve_for(std::size_t more) {
  const std::size_t want = entries_.size() + more;
  if (want <= entries_.bucket_count()) return;
  const ExclusiveEpoch epoch(epoch_);
  if (want > entries_.bucket_count()) entries_.rehash(want);
}

void AggregateStore::publish_many(std::uint32_t partition_id,
                                  std::span<const std::string_view> group_keys,
                                  std::span<const std::string_view> partials) {
  check_partition(partition_id);
  if (group_keys.size() != partials.size()) {
    throw InvalidArgument("publish_many: " + std::to_string(group_keys.size()) + " keys but " +
                          std::to_string(partials.size()) + " partials");
  }
  // Only worth an exclusive moment when the batch is big next to the map.
  if (group_keys.size() >= 1024) reserve_for(group_keys.size());
  const SharedEpoch epoch(epoch_);
  for (std::size_t i = 0; i < group_keys.size(); ++i) {
    publish_locked(group_keys[i], partition_id, partials[i]);
  }
}

std::optional<std::string> AggregateStore::get_partial(std::string_view group_key,
                                                       std::uint32_t partition_id) const {
  if (partition_id >= num_partitions_) return std::nullopt;
  const SharedEpoch epoch(epoch_);
  EntryMap::const_accessor entry;
  if (!entries_.find(entry, EntryKeyView{group_key, partition_id})) return std::nullopt;
  return entry->second;
}

std::vector<std::pair<std::uint32_t, std::string>> AggregateStore::collect_partials(
    std::string_view group_key) const {
  const SharedEpoch epoch(epoch_);
  std::vector<std::pair<std::uint32_t, std::string>> out;
  for (std::uint32_t id = 0; id < num_partitions_; ++id) {
    EntryMap::const_accessor entry;
    if (entries_.find(entry, EntryKeyView{group_key, id})) out.emplace_back(id, entry->second);
  }
  return out;
}

std::size_t AggregateStore::remove_group(std::string_view group_key) {
  const SharedEpoch epoch(epoch_);
  std::size_t removed = 0;
  for (std::uint32_t id = 0; id < num_partitions_; ++id) {
    if (entries_.erase(EntryKeyView{group_key, id})) ++removed;
  }
  return removed;
}

std::vector<std::string> AggregateStore::groups() const {
  const ExclusiveEpoch epoch(epoch_);
  std::vector<std::string_view> views;
  views.reserve(entries_.size());
  for (const auto& item : entries_) views.emplace_back(item.first.group);
  std::sort(views.begin(), views.end());
  views.erase(std::unique(views.begin(), views.end()), views.end());
  return {views.begin(), views.end()};  // copied while the entries cannot change
}

std::string AggregateStore::snapshot() const {
  const ExclusiveEpoch epoch(epoch_);
  struct Ref {
    std::string_view group;
    std::uint32_t partition;
    std::string_view partial;
  };
  std::vector<Ref> refs;
  refs.reserve(entries_.size());
  std::size_t payload = 0;
  for (const auto& item : entries_) {
    refs.push_back({item.first.group, item.first.partition, item.second});
    payload += item.first.group.size() + item.second.size() + 4 + kRecordEntryOverhead;
  }
  // Sorted so equal contents always give byte-identical (and identically hashed) snapshots.
  std::sort(refs.begin(), refs.end(), [](const Ref& a, const Ref& b) {
    return a.group != b.group ? a.group < b.group : a.partition < b.partition;
  });
  RecordWriter writer(RecordKind::kAggregateStore, payload + 64);
  std::string header;
  put_u32(header, kLayoutVersion);
  put_u32(header, num_partitions_);
  writer.add(kHeaderKey, header);
  std::string key;
  for (const Ref& r : refs) {
    key.assign(r.group);
    put_u32(key, r.partition);
    writer.add(key, r.partial);
  }
  return std::move(writer).finish();
}

void AggregateStore::restore(std::string_view data) {
  RecordReader reader(data);
  reader.expect_kind(RecordKind::kAggregateStore);
  RecordView record;
  if (!reader.next(record) || record.key != kHeaderKey) {
    throw CorruptDataError("aggregate store snapshot: missing header record");
  }
  ByteReader header(record.value, "aggregate store snapshot header");
  const std::uint32_t version = header.u32();
  (void)header.u32();  // the writer's num_partitions: informational; ids are checked below
  if (version != kLayoutVersion) {
    throw CorruptDataError("aggregate store snapshot: unsupported layout version " +
                           std::to_string(version));
  }
  EntryMap fresh_entries;
  fresh_entries.rehash(reader.count());
  while (reader.next(record)) {
    if (record.key.size() < 4) {
      throw CorruptDataError("aggregate store snapshot: entry key shorter than 4 bytes");
    }
    const std::string_view group = record.key.substr(0, record.key.size() - 4);
    const std::uint32_t id = load_u32(record.key.data() + group.size());
    if (id >= num_partitions_) {
      throw CorruptDataError("aggregate store snapshot: partition id " + std::to_string(id) +
                             " >= num_partitions " + std::to_string(num_partitions_));
    }
    EntryMap::accessor entry;
    if (!fresh_entries.insert(entry, EntryKeyView{group, id})) {
      throw CorruptDataError("aggregate store snapshot: duplicate entry for partition " +
                             std::to_string(id));
    }
    entry->second.assign(record.value);
  }
  const ExclusiveEpoch epoch(epoch_);
  entries_.swap(fresh_entries);
  // The old contents are freed when fresh_entries goes out of scope, after the lock.
}

std::size_t AggregateStore::memory_bytes() const {
  const ExclusiveEpoch epoch(epoch_);
  // TBB map node: bucket link + per-node rw lock + the value; plus one bucket pointer and
  // lock per bucket. Strings count their heap capacity when it exceeds the inline buffer.
  constexpr std::size_t kNodeOverhead = 2 * sizeof(void*);
  constexpr std::size_t kBucket = 2 * sizeof(void*);
  auto heap = [](const std::string& s) { return s.capacity() > 15 ? s.capacity() + 1 : 0; };
  std::size_t total = sizeof(*this);
  total += entries_.bucket_count() * kBucket;
  for (const auto& item : entries_) {
    total += kNodeOverhead + sizeof(item) + heap(item.first.group) + heap(item.second);
  }
  return total;
}

}  // namespace streamstate
