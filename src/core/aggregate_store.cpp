#include "core/aggregate_store.h"

#include <algorithm>
#include <optional>
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
// Delta layout (kind kAggregateStoreDelta):
//   record 0: key "streamstate.aggregate_store.delta", value u32 layout version,
//             u32 num_partitions, u32 parent identity, u64 sequence
//   then one record per changed entry: key = 'u' (published) or 'r' (removed) + group
//   bytes + u32 LE partition id; value = the partial (empty for a removal).
constexpr std::string_view kDeltaHeaderKey = "streamstate.aggregate_store.delta";
constexpr std::uint32_t kDeltaLayoutVersion = 1;
constexpr char kUpsert = 'u';
constexpr char kRemove = 'r';

[[noreturn]] void corrupt_delta(const std::string& what) {
  throw CorruptDataError("aggregate store delta: " + what);
}
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

bool AggregateStore::publish_locked(std::string_view group_key, std::uint32_t partition_id,
                                    std::string_view partial) {
  EntryMap::accessor entry;
  entries_.insert(entry, EntryKeyView{group_key, partition_id});
  entry->second.bytes.assign(partial);
  if (entry->second.dirty) return false;
  entry->second.dirty = true;
  return true;
}

void AggregateStore::log_change(EntryKeyView key) {
  ChangeLog& log = logs_[key.partition % kLogShards];
  const std::lock_guard<std::mutex> lock(log.mutex);
  log.keys.emplace_back(key);
}

void AggregateStore::publish(std::string_view group_key, std::uint32_t partition_id,
                             std::string_view partial) {
  check_partition(partition_id);
  const SharedEpoch epoch(epoch_);
  if (publish_locked(group_key, partition_id, partial)) {
    log_change(EntryKeyView{group_key, partition_id});
  }
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
  std::vector<std::size_t> newly_dirty;
  for (std::size_t i = 0; i < group_keys.size(); ++i) {
    if (publish_locked(group_keys[i], partition_id, partials[i])) newly_dirty.push_back(i);
  }
  if (newly_dirty.empty()) return;
  ChangeLog& log = logs_[partition_id % kLogShards];
  const std::lock_guard<std::mutex> lock(log.mutex);
  for (const std::size_t i : newly_dirty) {
    log.keys.emplace_back(EntryKeyView{group_keys[i], partition_id});
  }
}

std::optional<std::string> AggregateStore::get_partial(std::string_view group_key,
                                                       std::uint32_t partition_id) const {
  if (partition_id >= num_partitions_) return std::nullopt;
  const SharedEpoch epoch(epoch_);
  EntryMap::const_accessor entry;
  if (!entries_.find(entry, EntryKeyView{group_key, partition_id})) return std::nullopt;
  return entry->second.bytes;
}

std::vector<std::pair<std::uint32_t, std::string>> AggregateStore::collect_partials(
    std::string_view group_key) const {
  const SharedEpoch epoch(epoch_);
  std::vector<std::pair<std::uint32_t, std::string>> out;
  for (std::uint32_t id = 0; id < num_partitions_; ++id) {
    EntryMap::const_accessor entry;
    if (entries_.find(entry, EntryKeyView{group_key, id})) out.emplace_back(id, entry->second.bytes);
  }
  return out;
}

std::size_t AggregateStore::remove_group(std::string_view group_key) {
  const SharedEpoch epoch(epoch_);
  std::size_t removed = 0;
  for (std::uint32_t id = 0; id < num_partitions_; ++id) {
    if (entries_.erase(EntryKeyView{group_key, id})) {
      ++removed;
      log_change(EntryKeyView{group_key, id});
    }
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

std::string AggregateStore::snapshot() {
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
    refs.push_back({item.first.group, item.first.partition, item.second.bytes});
    payload += item.first.group.size() + item.second.bytes.size() + 4 + kRecordEntryOverhead;
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
  std::string out = std::move(writer).finish();
  reset_tracking(out, 0);
  return out;
}

void AggregateStore::reset_tracking(std::string_view capture, std::uint64_t sequence) noexcept {
  for (ChangeLog& log : logs_) {
    for (const EntryKey& key : log.keys) {
      EntryMap::accessor entry;
      if (entries_.find(entry, EntryKeyView{key.group, key.partition})) entry->second.dirty = false;
    }
    log.keys.clear();
  }
  identity_ = record_identity(capture);
  sequence_ = sequence;
}

std::string AggregateStore::snapshot_delta() {
  const ExclusiveEpoch epoch(epoch_);
  std::vector<EntryKeyView> changed;
  for (const ChangeLog& log : logs_) {
    for (const EntryKey& key : log.keys) changed.push_back({key.group, key.partition});
  }
  // A key removed and published again is logged twice: write it once, as it is now.
  std::sort(changed.begin(), changed.end(), [](const EntryKeyView& a, const EntryKeyView& b) {
    return a.group != b.group ? a.group < b.group : a.partition < b.partition;
  });
  changed.erase(std::unique(changed.begin(), changed.end(),
                            [](const EntryKeyView& a, const EntryKeyView& b) {
                              return a.group == b.group && a.partition == b.partition;
                            }),
                changed.end());
  RecordWriter writer(RecordKind::kAggregateStoreDelta);
  std::string header;
  put_u32(header, kDeltaLayoutVersion);
  put_u32(header, num_partitions_);
  put_u32(header, identity_);
  put_u64(header, sequence_ + 1);
  writer.add(kDeltaHeaderKey, header);
  std::string key;
  for (const EntryKeyView& k : changed) {
    EntryMap::const_accessor entry;
    const bool present = entries_.find(entry, k);
    key.assign(1, present ? kUpsert : kRemove);
    key.append(k.group);
    put_u32(key, k.partition);
    writer.add(key, present ? std::string_view(entry->second.bytes) : std::string_view());
  }
  std::string out = std::move(writer).finish();
  reset_tracking(out, sequence_ + 1);
  return out;
}

void AggregateStore::apply_delta(std::string_view data) {
  RecordReader reader(data);
  reader.expect_kind(RecordKind::kAggregateStoreDelta);
  RecordView record;
  if (!reader.next(record) || record.key != kDeltaHeaderKey) corrupt_delta("missing header");
  ByteReader header(record.value, "aggregate store delta header");
  const std::uint32_t version = header.u32();
  const std::uint32_t np = header.u32();
  const std::uint32_t parent = header.u32();
  const std::uint64_t sequence = header.u64();
  if (!header.at_end()) corrupt_delta("trailing bytes in the header");
  if (version != kDeltaLayoutVersion) {
    corrupt_delta("unsupported layout version " + std::to_string(version));
  }
  if (np != num_partitions_) {
    corrupt_delta("written by a store with " + std::to_string(np) + " partitions (this one has " +
                  std::to_string(num_partitions_) + ")");
  }
  // Every change is decoded and checked before anything is touched.
  struct Change {
    EntryKeyView key;
    std::optional<std::string_view> partial;  // nullopt: removed
  };
  std::vector<Change> changes;
  changes.reserve(reader.count());
  while (reader.next(record)) {
    if (record.key.size() < 5 || (record.key[0] != kUpsert && record.key[0] != kRemove)) {
      corrupt_delta("malformed entry key");
    }
    const std::string_view group = record.key.substr(1, record.key.size() - 5);
    const std::uint32_t id = load_u32(record.key.data() + 1 + group.size());
    if (id >= num_partitions_) corrupt_delta("partition id " + std::to_string(id) + " out of range");
    if (record.key[0] == kRemove && !record.value.empty()) corrupt_delta("a removal with a value");
    changes.push_back({{group, id},
                       record.key[0] == kUpsert ? std::optional(record.value) : std::nullopt});
  }
  for (std::size_t i = 1; i < changes.size(); ++i) {
    const EntryKeyView& a = changes[i - 1].key;
    const EntryKeyView& b = changes[i].key;
    if (!(a.group != b.group ? a.group < b.group : a.partition < b.partition)) {
      corrupt_delta("entries not in strictly ascending (group, partition) order");
    }
  }
  const ExclusiveEpoch epoch(epoch_);
  if (parent != identity_) {
    corrupt_delta("delta " + std::to_string(sequence) +
                  " does not follow this store's state (its parent is another snapshot or "
                  "delta; this store is at delta " + std::to_string(sequence_) + " of its chain)");
  }
  for (const Change& c : changes) {
    if (c.partial) {
      EntryMap::accessor entry;
      entries_.insert(entry, c.key);
      entry->second.bytes.assign(*c.partial);
    } else {
      entries_.erase(c.key);
    }
  }
  reset_tracking(data, sequence);
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
    entry->second.bytes.assign(record.value);
  }
  const ExclusiveEpoch epoch(epoch_);
  entries_.swap(fresh_entries);
  for (ChangeLog& log : logs_) log.keys.clear();  // they name entries of the old contents
  identity_ = record_identity(data);
  sequence_ = 0;
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
    total += kNodeOverhead + sizeof(item) + heap(item.first.group) + heap(item.second.bytes);
  }
  return total;
}

}  // namespace streamstate
