#include "core/numeric_aggregate_store.h"
#include "core/parallel.h"

#include <algorithm>
#include <bit>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include <oneapi/tbb/blocked_range.h>

#include "core/byte_io.h"
#include "core/errors.h"
#include "core/flat_table.h"
#include "core/partition_router.h"
#include "core/record_codec.h"
#include "core/snapshot_records.h"

namespace streamstate {
namespace {

// Snapshot layout inside the record container (kind kNumericAggregateStore):
//   "streamstate.numeric_aggregate_store": u32 layout version, u32 num_partitions,
//                                          u8 key type (0 int64, 1 bytes)
//   "shared" (any number of chunks): u32 n, n x (key, u32 k, k x (u32 partition, Moments))
//   "local" + u32 partition (any number of chunks per partition): u32 n, n x (key, Moments)
// A key is 8 bytes LE for int64 keys, u32 length + bytes for bytes keys. Chunks keep each
// record far below the container's 4 GiB field limit. Layout 2 local entries are what was
// folded since the partition's last publish; layout 1 local entries were the partition's
// full partials (restore publishes them).
//
// Layout 3 (written when the store has named value columns, or more than one): the header
// goes on with u32 width, width x (u32 length + name bytes), and every Moments above
// becomes width Moments (column 0 first). A one unnamed column store still writes layout 2,
// byte for byte as before columns existed.
//
// Layout 4 (every snapshot since key groups): the header is u32 version, u32
// num_partitions, u8 key type, u32 key_groups, u8 form (0 a capture, 1 an export of some
// partitions), u32 width (0: the one unnamed column), width x (u32 length + name bytes),
// and for an export u32 n, n x u32 partition (the partitions exported). Then one
// "sections" record: u32 n, n x (u32 group, u32 records, u64 entries), groups strictly
// ascending, and the sections' records follow in that order, `records` of them each, so a
// reader skips a section it does not want without decoding it. A capture's section holds
// "shared" chunks (as above, width Moments per slot) and "local" + u32 partition chunks;
// an export's holds "merged" chunks: u32 n, n x (key, width Moments). Every key of a
// section belongs to its group.
//
// Delta layout (kind kNumericAggregateStoreDelta):
//   "streamstate.numeric_aggregate_store.delta": u32 layout version, u32 num_partitions,
//        u8 key type, u32 parent identity, u64 sequence
//   "shared" + u32 partition (chunks): u32 n, n x (key, Moments): that partition's slots
//   "reset" + u32 partition (empty): the partition published since the parent, so its
//        local tables are emptied before its "local" entries apply
//   "local" + u32 partition (chunks): u32 n, n x (key, Moments): local entries to set
// Delta layout 2 is layout 1 with the value columns after the header's sequence, and width
// Moments per entry (as snapshot layout 3 extends layout 2).
constexpr std::string_view kHeaderKey = "streamstate.numeric_aggregate_store";
constexpr std::string_view kDeltaHeaderKey = "streamstate.numeric_aggregate_store.delta";
constexpr std::string_view kSharedKey = "shared";
constexpr std::string_view kLocalPrefix = "local";
constexpr std::string_view kResetPrefix = "reset";
constexpr std::string_view kSectionsKey = "sections";
constexpr std::string_view kMergedKey = "merged";
constexpr std::uint32_t kLayoutVersion = 2;  // read only, as layouts 1 and 3
constexpr std::uint32_t kFullPartialsLayout = 1;
constexpr std::uint32_t kColumnsLayout = 3;
constexpr std::uint32_t kKeyGroupsLayout = 4;
constexpr std::uint8_t kCaptureForm = 0;
constexpr std::uint8_t kExportForm = 1;
// A chunk decoded outside a section (older layouts): its keys may be of any group.
constexpr std::uint32_t kAnyGroup = std::numeric_limits<std::uint32_t>::max();
constexpr std::uint32_t kDeltaLayoutVersion = 1;
constexpr std::uint32_t kDeltaColumnsLayout = 2;
constexpr std::uint32_t kMaxPartitions = 65536;
constexpr std::size_t kChunkEntries = 1 << 16;
// The end of a chain of links (repartition_into's local entries of a key).
constexpr std::size_t kNoLink = std::numeric_limits<std::size_t>::max();

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

// Which snapshot format found the damage, leading every CorruptDataError it raises.
constexpr std::string_view kCodec = "numeric aggregate store snapshot";

[[noreturn]] void corrupt(const std::string& what) {
  throw CorruptDataError(std::string(kCodec) + ": " + what);
}

// Reads a chunk's entry count and rejects counts the chunk cannot possibly hold, so a
// forged count never drives a giant reservation.
std::uint32_t chunk_count(ByteReader& in, std::size_t min_entry_bytes) {
  const std::uint32_t n = in.u32();
  if (n > in.remaining() / min_entry_bytes) corrupt("chunk entry count larger than its bytes");
  return n;
}

std::optional<std::uint32_t> partition_of(std::string_view key, std::string_view prefix,
                                          std::uint32_t np) {
  return partition_of_record(key, prefix, np, kCodec);
}

template <class K>
void check_key_type(std::uint8_t tag) {
  if (tag != K::kTag) {
    corrupt("written by a store with a different key_type (this store's is '" +
            std::string(K::kName) + "')");
  }
}

// A row's columns 1..: `extra` Moments appended to `out`.
void decode_more(ByteReader& in, std::vector<Moments>& out, std::size_t extra) {
  for (std::size_t c = 0; c < extra; ++c) out.push_back(Moments::decode(in));
}

void encode_more(std::string& out, const Moments* more, std::size_t extra) {
  for (std::size_t c = 0; c < extra; ++c) more[c].encode(out);
}

// Staged local state of a partition: kShards tables and (width > 1) their columns 1...
template <class Local>
struct StagedLocal {
  std::vector<typename Local::Table> tables;
  std::vector<std::vector<Moments>> more;
  void allocate() {
    tables.resize(Local::kShards);
    more.resize(Local::kShards);
  }
  [[nodiscard]] bool empty() const noexcept { return tables.empty(); }
};

// A "local" chunk (u32 n, n x (key, 1 + extra Moments)) into a partition's staged tables.
// In a section (`group` not kAnyGroup) every key must be of that group of `key_groups`.
void check_group(std::uint64_t hash, std::uint32_t group, std::uint32_t key_groups) {
  if (group != kAnyGroup && key_group_of_hash(hash, key_groups) != group) {
    corrupt("a key in the section of key group " + std::to_string(group) +
            " belongs to another group");
  }
}

template <class Local>
std::size_t read_local_chunk(ByteReader& in, StagedLocal<Local>& staged, std::uint32_t pid,
                             std::size_t extra, std::uint32_t group = kAnyGroup,
                             std::uint32_t key_groups = 1) {
  const std::uint32_t n = chunk_count(in, 4 + (1 + extra) * Moments::kEncodedSize);
  for (std::uint32_t i = 0; i < n; ++i) {
    const auto key = Local::Keys::decode(in);
    const std::uint64_t hash = Local::Keys::hash(key);
    check_group(hash, group, key_groups);
    const std::size_t s = Local::shard_of(hash);
    auto& table = staged.tables[s];
    if (table.size() >= Local::kMaxPerShard) corrupt("too many local entries in a shard");
    const auto [idx, inserted] = table.emplace(key, hash);
    if (!inserted) corrupt("duplicate local entry in partition " + std::to_string(pid));
    table.value_at(idx) = Moments::decode(in);
    decode_more(in, staged.more[s], extra);
  }
  return n;
}

// The value columns a header names (layout 3 / delta layout 2), read once each, bounded
// by the bytes present. With `zero_is_unnamed` (layout 4) a width of 0 names the one
// unnamed column.
std::vector<std::string> read_columns(ByteReader& in, std::size_t max_columns,
                                      bool zero_is_unnamed = false) {
  const std::uint32_t width = in.u32();
  if (width == 0 && zero_is_unnamed) return {};
  if (width == 0 || width > max_columns || width > in.remaining() / 4) {
    corrupt("a header with " + std::to_string(width) + " value columns");
  }
  std::vector<std::string> columns;
  columns.reserve(width);
  for (std::uint32_t c = 0; c < width; ++c) {
    const std::uint32_t length = in.u32();
    if (length > in.remaining()) corrupt("a value column name longer than the header");
    columns.emplace_back(in.take(length));
  }
  return columns;
}

void put_columns(std::string& header, const std::vector<std::string>& columns) {
  put_u32(header, static_cast<std::uint32_t>(columns.size()));
  for (const std::string& name : columns) {
    put_u32(header, static_cast<std::uint32_t>(name.size()));
    header += name;
  }
}

void check_columns(const std::vector<std::string>& written, const std::vector<std::string>& mine) {
  if (written != mine) {
    corrupt("written by a store with " + describe_value_columns(written) + " (this store has " +
            describe_value_columns(mine) + ")");
  }
}

// The header fields a snapshot and a delta share: layout version, partitions, key type.
template <class K>
std::string store_header(std::uint32_t version, std::uint32_t num_partitions) {
  std::string header;
  put_u32(header, version);
  put_u32(header, num_partitions);
  header.push_back(static_cast<char>(K::kTag));
  return header;
}

// A layout 4 section as its index lists it.
struct Section {
  std::uint32_t group;
  std::uint32_t records;
  std::uint64_t entries;
};

// Entries [begin, end) of one source of a section (0: the shared map or an export's
// rows, pid + 1: partition pid's local entries).
struct Run {
  std::uint32_t group;
  std::uint32_t source;
  std::size_t begin;
  std::size_t end;
};

// The runs of equal groups in n entries already in ascending group order.
template <class GroupAt>
void add_runs(std::vector<Run>& runs, std::size_t n, std::uint32_t source, GroupAt&& group_at) {
  for (std::size_t i = 0; i < n;) {
    const std::uint32_t group = group_at(i);
    std::size_t end = i + 1;
    while (end < n && group_at(end) == group) ++end;
    runs.push_back(Run{group, source, i, end});
    i = end;
  }
}

std::size_t chunks_of(const Run& run) noexcept {
  return (run.end - run.begin + kChunkEntries - 1) / kChunkEntries;
}

// The "sections" record of runs sorted by (group, source).
std::string section_index(const std::vector<Run>& runs) {
  std::vector<Section> sections;
  for (const Run& run : runs) {
    if (sections.empty() || sections.back().group != run.group) {
      sections.push_back(Section{run.group, 0, 0});
    }
    // The container holds fewer than 2^32 records, so a section's count fits.
    sections.back().records += static_cast<std::uint32_t>(chunks_of(run));
    sections.back().entries += run.end - run.begin;
  }
  std::string out;
  put_u32(out, static_cast<std::uint32_t>(sections.size()));
  for (const Section& section : sections) {
    put_u32(out, section.group);
    put_u32(out, section.records);
    put_u64(out, section.entries);
  }
  return out;
}

// Entries [begin, end) as chunks of at most kChunkEntries under `name`, each encoded
// straight into the container: encode(out, i) appends entry i, of about `entry_bytes`.
template <class Encode>
void write_chunks(RecordWriter& writer, std::string_view name, std::size_t begin,
                  std::size_t end, std::size_t entry_bytes, Encode&& encode) {
  for (std::size_t start = begin; start < end; start += kChunkEntries) {
    const std::size_t stop = std::min(end, start + kChunkEntries);
    writer.add_with(name, 4 + (stop - start) * entry_bytes, [&](std::string& out) {
      put_u32(out, static_cast<std::uint32_t>(stop - start));
      for (std::size_t i = start; i < stop; ++i) encode(out, i);
    });
  }
}

template <class Encode>
void write_run(RecordWriter& writer, std::string_view name, const Run& run,
               std::size_t entry_bytes, Encode&& encode) {
  write_chunks(writer, name, run.begin, run.end, entry_bytes, std::forward<Encode>(encode));
}

// Entries visited in an order other than their memory's (a capture in key-group order, a
// delta's dirty slots) are fetched this many ahead, so ~a dozen misses overlap instead of
// each entry waiting for its own.
constexpr std::size_t kFetchAhead = 32;

// A shared map node's first cache lines (its key and inline slots).
template <class Node>
void prefetch_node(const Node* node) noexcept {
  flat_detail::prefetch(node);
  flat_detail::prefetch(reinterpret_cast<const char*>(node) + 64);
}

// Layout 4's header: the common fields, key groups, form and value columns.
template <class K>
std::string sectioned_header(std::uint32_t num_partitions, std::uint32_t key_groups,
                             std::uint8_t form, const std::vector<std::string>& columns) {
  std::string header = store_header<K>(kKeyGroupsLayout, num_partitions);
  put_u32(header, key_groups);
  header.push_back(static_cast<char>(form));
  put_u32(header, static_cast<std::uint32_t>(columns.size()));
  for (const std::string& name : columns) {
    put_u32(header, static_cast<std::uint32_t>(name.size()));
    header += name;
  }
  return header;
}

// Both captures lock the same way: the map quiescent, every partition stopped.
class Quiescent {
 public:
  template <class Partitions>
  Quiescent(EpochLock& epoch, const Partitions& partitions) : epoch_(epoch) {
    locks_.reserve(partitions.size());
    for (const auto& p : partitions) {
      locks_.emplace_back(p->mutex);
      p->local.settle();  // a capture reads the tables: rows staged by fold() go in first
    }
  }

 private:
  ExclusiveEpoch epoch_;
  std::vector<std::unique_lock<std::mutex>> locks_;
};

}  // namespace

template <class K>
NumericAggregateStore<K>::NumericAggregateStore(std::uint32_t num_partitions, NanPolicy policy,
                                                std::vector<std::string> columns,
                                                std::uint32_t key_groups)
    : policy_(policy),
      key_groups_(key_groups),
      columns_(std::move(columns)),
      width_(std::max<std::size_t>(1, columns_.size())) {
  if (num_partitions == 0 || num_partitions > kMaxPartitions) {
    throw InvalidArgument("num_partitions must be between 1 and 65536, got " +
                          std::to_string(num_partitions));
  }
  check_key_groups(num_partitions, key_groups);
  if (columns_.size() > kMaxColumns) {
    throw InvalidArgument("at most " + std::to_string(kMaxColumns) + " value columns, got " +
                          std::to_string(columns_.size()));
  }
  for (std::size_t c = 0; c < columns_.size(); ++c) {
    if (columns_[c].empty()) throw InvalidArgument("a value column name is empty");
    if (std::find(columns_.begin(), columns_.begin() + static_cast<std::ptrdiff_t>(c),
                  columns_[c]) != columns_.begin() + static_cast<std::ptrdiff_t>(c)) {
      throw InvalidArgument("value column '" + columns_[c] + "' is named twice");
    }
  }
  partitions_.reserve(num_partitions);
  for (std::uint32_t i = 0; i < num_partitions; ++i) {
    partitions_.push_back(std::make_unique<Partition>(width_));
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
                                    const double* values, std::size_t n,
                                    const std::uint64_t* hashes) {
  Partition& p = partition(partition_id);
  const std::lock_guard<std::mutex> lock(p.mutex);
  p.local.fold(keys, values, n, policy_, hashes);
}

template <class K>
std::pair<typename NumericAggregateStore<K>::Slot*, bool> NumericAggregateStore<K>::Slots::slot(
    std::uint32_t partition_id, std::size_t extra) {
  Slot* slots = data();
  std::uint32_t at = 0;
  while (at < size_ && slots[at].partition < partition_id) ++at;
  if (at < size_ && slots[at].partition == partition_id) return {slots + at, false};
  if (extra > 0 && !more_) more_ = std::make_unique<Moments[]>(capacity_ * extra);
  if (size_ == capacity_) {
    const std::uint32_t grown = capacity_ * 2;
    // Both arrays are allocated before either is replaced.
    auto bigger = std::make_unique<Slot[]>(grown);
    std::unique_ptr<Moments[]> bigger_more;
    if (extra > 0) bigger_more = std::make_unique<Moments[]>(grown * extra);
    std::copy(slots, slots + size_, bigger.get());
    if (extra > 0) std::copy(more_.get(), more_.get() + size_ * extra, bigger_more.get());
    heap_ = std::move(bigger);
    if (extra > 0) more_ = std::move(bigger_more);
    capacity_ = grown;
    slots = heap_.get();
  }
  std::copy_backward(slots + at, slots + size_, slots + size_ + 1);
  slots[at] = Slot{partition_id, false, Moments{}};
  if (extra > 0) {
    Moments* more = more_.get();
    std::copy_backward(more + at * extra, more + size_ * extra, more + (size_ + 1) * extra);
    std::fill(more + at * extra, more + (at + 1) * extra, Moments{});
  }
  ++size_;
  return {slots + at, true};
}

template <class K>
typename NumericAggregateStore<K>::Slot* NumericAggregateStore<K>::Slots::find(
    std::uint32_t partition_id) noexcept {
  Slot* slots = data();
  for (std::uint32_t at = 0; at < size_; ++at) {
    if (slots[at].partition == partition_id) return slots + at;
  }
  return nullptr;
}

template <class K>
Moments NumericAggregateStore<K>::merged(const Slots& slots, std::size_t column) const noexcept {
  Moments out;
  if (column == 0) {
    for (const Slot& s : slots) out.merge(s.partial);
  } else {
    const std::size_t extra = width_ - 1;
    for (const Slot& s : slots) out.merge(slots.more(&s, extra)[column - 1]);
  }
  return out;
}

template <class K>
void NumericAggregateStore<K>::put(Slots& slots, std::uint32_t partition, const Moments& first,
                                   const Moments* more) const {
  const std::size_t extra = width_ - 1;
  Slot* slot = slots.slot(partition, extra).first;
  slot->partial = first;
  if (extra > 0 && more != nullptr) std::copy(more, more + extra, slots.more(slot, extra));
}

template <class K>
void NumericAggregateStore<K>::reserve_for(Partition& p) {
  std::size_t pending = 0;
  {
    const std::lock_guard<std::mutex> lock(p.mutex);
    p.local.settle();
    pending = p.local.size();
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
  p.local.settle();  // again: a fold may have staged rows since reserve_for()
  std::vector<std::uint64_t> order;  // (bucket << 32) | Ref
  p.local.collect_all(order);
  p.dirty.reserve(p.dirty.size() + order.size());  // no allocation once merging starts
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
  const std::size_t extra = width_ - 1;
  for (std::size_t step = 0; step < n; ++step) {
    std::size_t j = start + step;
    if (j >= n) j -= n;
    std::size_t ahead = j + kAhead;
    if (ahead >= n) ahead -= n;
    if (kAhead < n) local.prefetch(static_cast<Ref>(order[ahead]));
    const auto ref = static_cast<Ref>(order[j]);
    typename SharedMap::accessor entry;
    shared_.insert(entry, local.key_at(ref));
    const auto [slot, created] = entry->second.slot(partition_id, extra);
    slot->partial.merge(local.value_at(ref));
    if (extra > 0) {
      Moments* into = entry->second.more(slot, extra);
      const Moments* from = local.more_at(ref);
      for (std::size_t c = 0; c < extra; ++c) into[c].merge(from[c]);
    }
    if (created) ++p.published;
    if (!slot->dirty) {
      slot->dirty = true;
      p.dirty.push_back(&*entry);
    }
  }
  p.local.drain();
  return order.size();
}

template <class K>
std::optional<Moments> NumericAggregateStore<K>::result(View key, std::size_t column) const {
  if (column >= width_) {
    throw InvalidArgument("value column " + std::to_string(column) + " out of range [0, " +
                          std::to_string(width_) + ")");
  }
  const SharedEpoch epoch(epoch_);
  typename SharedMap::const_accessor entry;
  if (!shared_.find(entry, key)) return std::nullopt;
  return merged(entry->second, column);
}

template <class K>
void NumericAggregateStore<K>::result_columns(KeyColumn& keys, StatArrays& columns) const {
  if (width_ != 1) throw InvalidArgument("result_columns: the store has several value columns");
  result_columns(keys, &columns);
}

template <class K>
void NumericAggregateStore<K>::result_columns(KeyColumn& keys, StatArrays* columns) const {
  const ExclusiveEpoch epoch(epoch_);
  // One serial walk collects the nodes (in bucket order, which publish made the memory
  // order too); the merge and the column writes then run in parallel by index, straight
  // into the output buffers.
  std::vector<const typename SharedMap::value_type*> items;
  items.reserve(shared_.size());
  for (const auto& item : shared_) items.push_back(&item);
  const std::size_t n = items.size();
  for (std::size_t c = 0; c < width_; ++c) columns[c].allocate(n);
  if constexpr (std::is_same_v<K, Int64Keys>) keys.keys.resize(n);
  streamstate::parallel_for(tbb::blocked_range<std::size_t>(0, n, 16384),
                    [&](const tbb::blocked_range<std::size_t>& r) {
                      for (std::size_t i = r.begin(); i != r.end(); ++i) {
                        for (std::size_t c = 0; c < width_; ++c) {
                          columns[c].set(i, merged(items[i]->second, c));
                        }
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
  p.local.settle();
  return read(std::as_const(p.local));
}

template <class K>
std::size_t NumericAggregateStore<K>::partition_size(std::uint32_t partition_id) const {
  const SharedEpoch epoch(epoch_);
  const Partition& p = partition(partition_id);
  const std::lock_guard<std::mutex> lock(p.mutex);
  p.local.settle();
  // Local keys the partition has not published before count once more.
  std::size_t fresh = 0;
  for (std::size_t s = 0; s < Local::kShards; ++s) {
    const auto& table = p.local.shard(s);
    for (std::size_t i = 0; i < table.size(); ++i) {
      typename SharedMap::accessor entry;
      if (!shared_.find(entry, table.key_at(i)) || entry->second.find(partition_id) == nullptr) {
        ++fresh;
      }
    }
  }
  return p.published + fresh;
}

template <class K>
std::size_t NumericAggregateStore<K>::partition_pending(std::uint32_t partition_id) const {
  return read_local(partition_id, [](const Local& local) { return local.size(); });
}

template <class K>
std::size_t NumericAggregateStore<K>::partition_memory_bytes(std::uint32_t partition_id) const {
  const Partition& p = partition(partition_id);
  const std::lock_guard<std::mutex> lock(p.mutex);
  return p.local.memory_bytes() + p.published * (sizeof(Slot) + (width_ - 1) * sizeof(Moments)) +
         p.dirty.capacity() * sizeof(Node*);
}

template <class K>
void NumericAggregateStore<K>::reset_tracking(std::string_view capture,
                                              std::uint64_t sequence) noexcept {
  for (std::uint32_t pid = 0; pid < num_partitions(); ++pid) {
    Partition& p = *partitions_[pid];
    for (Node* node : p.dirty) {
      if (Slot* slot = node->second.find(pid)) slot->dirty = false;
    }
    p.dirty.clear();
    p.local.forget_changes();
  }
  identity_ = record_identity(capture);
  sequence_ = sequence;
}

template <class K>
std::string NumericAggregateStore<K>::snapshot() {
  const Quiescent quiescent(epoch_, partitions_);
  const std::uint32_t np = num_partitions();
  const std::size_t extra = width_ - 1;

  // Shared entries by (group, key), so equal contents give byte-identical snapshots.
  // (The key's view rides along, so sorting int64 keys never reads the nodes.)
  struct Item {
    std::uint32_t group;
    View key;
    const Node* node;
  };
  std::vector<Item> items;
  items.reserve(shared_.size());
  for (const auto& item : shared_) {
    const View key = K::view_of(item.first);
    items.push_back(Item{key_group_of<K>(key, key_groups_), key, &item});
  }
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    if (a.group != b.group) return a.group < b.group;
    return K::less(a.key, b.key);
  });
  std::vector<Run> runs;
  add_runs(runs, items.size(), 0, [&](std::size_t i) { return items[i].group; });

  // Local entries by group, each group's in table order (shard by shard, insertion order,
  // a stable sort): restoring rebuilds the tables in that order, so a restored store
  // snapshots to the same bytes.
  // Int64 keys make every local entry the same size, so each one's place in the container
  // is known from the per-group counts alone: the entries are then written in table order
  // (memory read front to back) to their places, instead of read in group order, which
  // misses the cache on every entry.
  constexpr bool kScatter = std::is_same_v<K, Int64Keys>;
  const auto group_bits = static_cast<unsigned>(std::bit_width(key_groups_ - 1));
  std::vector<std::vector<std::uint64_t>> local(np);  // (group << 32) | Ref; unless kScatter
  for (std::uint32_t pid = 0; pid < np; ++pid) {
    const Local& table = partitions_[pid]->local;
    if constexpr (kScatter) {
      std::vector<std::size_t> counts(key_groups_, 0);
      for (std::size_t s = 0; s < Local::kShards; ++s) {
        const auto& shard = table.shard(s);
        for (std::size_t i = 0; i < shard.size(); ++i) {
          ++counts[key_group_of_hash(shard.hash_at(i), key_groups_)];
        }
      }
      std::size_t begin = 0;
      for (std::uint32_t group = 0; group < key_groups_; ++group) {
        if (counts[group] == 0) continue;
        runs.push_back(Run{group, pid + 1, begin, begin + counts[group]});
        begin += counts[group];
      }
    } else {
      std::vector<std::uint64_t>& refs = local[pid];
      refs.reserve(table.size());
      for (std::size_t s = 0; s < Local::kShards; ++s) {
        const auto& shard = table.shard(s);
        for (std::size_t i = 0; i < shard.size(); ++i) {
          const std::uint64_t group = key_group_of_hash(shard.hash_at(i), key_groups_);
          refs.push_back((group << 32) | (s << Local::kIndexBits) | i);
        }
      }
      sort_by_high_word(refs, group_bits);
      add_runs(runs, refs.size(), pid + 1,
               [&](std::size_t i) { return static_cast<std::uint32_t>(refs[i] >> 32); });
    }
  }
  std::sort(runs.begin(), runs.end(), [](const Run& a, const Run& b) {
    return a.group != b.group ? a.group < b.group : a.source < b.source;
  });

  RecordWriter writer(RecordKind::kNumericAggregateStore);
  writer.add(kHeaderKey, sectioned_header<K>(np, key_groups_, kCaptureForm, columns_));
  writer.add(kSectionsKey, section_index(runs));
  const std::size_t moments_bytes = width_ * Moments::kEncodedSize;
  // (kScatter) The entry area of each local chunk, in container order.
  struct Area {
    const Run* run;
    std::size_t at;  // offset into the container
    std::size_t entries;
  };
  std::vector<Area> areas;
  for (const Run& run : runs) {
    if (run.source == 0) {
      write_run(writer, kSharedKey, run, 8 + 4 + moments_bytes, [&](std::string& out, std::size_t i) {
        if (i + kFetchAhead < items.size()) prefetch_node(items[i + kFetchAhead].node);
        const Node& node = *items[i].node;
        K::encode(out, K::view_of(node.first));
        put_u32(out, node.second.size());
        for (const Slot& slot : node.second) {
          put_u32(out, slot.partition);
          slot.partial.encode(out);
          if (extra > 0) encode_more(out, node.second.more(&slot, extra), extra);
        }
      });
    } else if constexpr (kScatter) {
      // Room for the run's chunks; where each chunk's entries go is noted for the scatter.
      const std::string name = partition_record_name(kLocalPrefix, run.source - 1);
      for (std::size_t start = run.begin; start < run.end; start += kChunkEntries) {
        const std::size_t n = std::min(run.end, start + kChunkEntries) - start;
        writer.add_with(name, 4 + n * (8 + moments_bytes), [&](std::string& out) {
          put_u32(out, static_cast<std::uint32_t>(n));
          areas.push_back(Area{&run, out.size(), n});
          out.resize(out.size() + n * (8 + moments_bytes));
        });
      }
    } else {
      const std::uint32_t pid = run.source - 1;
      const Local& table = partitions_[pid]->local;
      const std::vector<std::uint64_t>& refs = local[pid];
      write_run(writer, partition_record_name(kLocalPrefix, pid), run, 8 + moments_bytes,
                [&](std::string& out, std::size_t i) {
                  if (i + kFetchAhead < refs.size()) {
                    // Both ends: an entry need not sit in one cache line.
                    const auto ahead = static_cast<Ref>(refs[i + kFetchAhead]);
                    table.prefetch(ahead);
                    flat_detail::prefetch(&table.value_at(ahead).dsq);
                  }
                  const auto ref = static_cast<Ref>(refs[i]);
                  K::encode(out, table.key_at(ref));
                  table.value_at(ref).encode(out);
                  encode_more(out, table.more_at(ref), extra);
                });
    }
  }
  if constexpr (kScatter) {
    writer.overwrite([&](char* container) {
      // A run's chunks are consecutive areas; a partition's cursor per group starts at its
      // run's first and moves to the next when a chunk is full. The counts that sized the
      // runs are those of the tables walked here (the store is quiescent), so every entry
      // has its place and every place is written.
      struct Cursor {
        std::size_t area = 0;
        std::size_t left = 0;
        char* at = nullptr;
      };
      const std::size_t entry_bytes = 8 + moments_bytes;
      std::vector<Cursor> cursors(key_groups_);
      for (std::uint32_t pid = 0; pid < np; ++pid) {
        for (std::size_t a = 0; a < areas.size(); ++a) {
          const Area& area = areas[a];
          if (area.run->source == pid + 1 && (a == 0 || areas[a - 1].run != area.run)) {
            cursors[area.run->group] = Cursor{a, area.entries, container + area.at};
          }
        }
        const Local& table = partitions_[pid]->local;
        for (std::size_t s = 0; s < Local::kShards; ++s) {
          const auto& shard = table.shard(s);
          for (std::size_t i = 0; i < shard.size(); ++i) {
            Cursor& c = cursors[key_group_of_hash(shard.hash_at(i), key_groups_)];
            if (c.left == 0) {
              ++c.area;
              c.left = areas[c.area].entries;
              c.at = container + areas[c.area].at;
            }
            store_u64(c.at, static_cast<std::uint64_t>(shard.key_at(i)));
            shard.value_at(i).encode_to(c.at + 8);
            const Moments* more = table.more_in(s, i);
            for (std::size_t col = 0; col < extra; ++col) {
              more[col].encode_to(c.at + 8 + (col + 1) * Moments::kEncodedSize);
            }
            c.at += entry_bytes;
            --c.left;
          }
        }
      }
    });
  }
  std::string out = std::move(writer).finish();
  reset_tracking(out, 0);
  return out;
}

template <class K>
std::string NumericAggregateStore<K>::snapshot_partitions(
    const std::vector<std::uint32_t>& partitions) {
  const std::uint32_t np = num_partitions();
  std::vector<char> listed(np, 0);
  for (const std::uint32_t pid : partitions) {
    check_partition(pid);
    listed[pid] = 1;
  }
  const Quiescent quiescent(epoch_, partitions_);
  struct Row {
    std::uint32_t group;
    View key;  // into this store's map or tables, which stay put while it is quiescent
    std::size_t at;
  };
  std::vector<Row> rows;
  std::vector<Moments> values;
  merge_partials(
      listed,
      [&](std::size_t bound) {
        rows.reserve(bound);
        values.reserve(bound * width_);
      },
      [&](View key, const Moments* total) {
        rows.push_back(Row{key_group_of<K>(key, key_groups_), key, values.size()});
        values.insert(values.end(), total, total + width_);
      });
  std::sort(rows.begin(), rows.end(), [](const Row& a, const Row& b) {
    return a.group != b.group ? a.group < b.group : K::less(a.key, b.key);
  });
  std::vector<Run> runs;
  add_runs(runs, rows.size(), 0, [&](std::size_t i) { return rows[i].group; });

  RecordWriter writer(RecordKind::kNumericAggregateStore);
  std::string header = sectioned_header<K>(np, key_groups_, kExportForm, columns_);
  const auto exported = static_cast<std::uint32_t>(std::count(listed.begin(), listed.end(), 1));
  put_u32(header, exported);
  for (std::uint32_t pid = 0; pid < np; ++pid) {
    if (listed[pid] != 0) put_u32(header, pid);
  }
  writer.add(kHeaderKey, header);
  writer.add(kSectionsKey, section_index(runs));
  for (const Run& run : runs) {
    write_run(writer, kMergedKey, run, 8 + width_ * Moments::kEncodedSize,
              [&](std::string& out, std::size_t i) {
      K::encode(out, rows[i].key);
      for (std::size_t c = 0; c < width_; ++c) values[rows[i].at + c].encode(out);
    });
  }
  return std::move(writer).finish();  // an export, not a capture: tracking stays
}

template <class K>
std::string NumericAggregateStore<K>::snapshot_delta() {
  const Quiescent quiescent(epoch_, partitions_);
  RecordWriter writer(RecordKind::kNumericAggregateStoreDelta);
  std::string header = store_header<K>(
      columns_.empty() ? kDeltaLayoutVersion : kDeltaColumnsLayout, num_partitions());
  put_u32(header, identity_);
  put_u64(header, sequence_ + 1);
  if (!columns_.empty()) put_columns(header, columns_);
  writer.add(kDeltaHeaderKey, header);
  const std::size_t extra = width_ - 1;

  const std::size_t entry_bytes = 8 + width_ * Moments::kEncodedSize;
  std::vector<std::uint64_t> refs;
  for (std::uint32_t pid = 0; pid < num_partitions(); ++pid) {
    const Partition& p = *partitions_[pid];
    write_chunks(writer, partition_record_name(kSharedKey, pid), 0, p.dirty.size(), entry_bytes,
                 [&](std::string& out, std::size_t i) {
                   if (i + kFetchAhead < p.dirty.size()) prefetch_node(p.dirty[i + kFetchAhead]);
                   Node* node = p.dirty[i];
                   K::encode(out, K::view_of(node->first));
                   const Slot* slot = node->second.find(pid);  // listed nodes hold the slot
                   slot->partial.encode(out);
                   if (extra > 0) encode_more(out, node->second.more(slot, extra), extra);
                 });
    if (p.local.drained_since_capture()) writer.add(partition_record_name(kResetPrefix, pid), {});
    refs.clear();
    p.local.collect_changes(refs);
    write_chunks(writer, partition_record_name(kLocalPrefix, pid), 0, refs.size(), entry_bytes,
                 [&](std::string& out, std::size_t i) {
                   const auto ref = static_cast<Ref>(refs[i]);
                   K::encode(out, p.local.key_at(ref));
                   p.local.value_at(ref).encode(out);
                   encode_more(out, p.local.more_at(ref), extra);
                 });
  }
  std::string out = std::move(writer).finish();
  reset_tracking(out, sequence_ + 1);
  return out;
}

template <class K>
void NumericAggregateStore<K>::apply_delta(std::string_view data) {
  RecordReader reader(data);
  reader.expect_kind(RecordKind::kNumericAggregateStoreDelta);
  RecordView record;
  if (!reader.next(record) || record.key != kDeltaHeaderKey) corrupt("delta: missing header");
  std::uint32_t parent = 0;
  std::uint64_t sequence = 0;
  {
    ByteReader header(record.value, "numeric aggregate store delta header");
    const std::uint32_t version = header.u32();
    const std::uint32_t np = header.u32();
    const auto tag = static_cast<std::uint8_t>(header.take(1)[0]);
    parent = header.u32();
    sequence = header.u64();
    if (version != kDeltaLayoutVersion && version != kDeltaColumnsLayout) {
      corrupt("delta: unsupported layout version " + std::to_string(version));
    }
    const std::vector<std::string> written = version == kDeltaColumnsLayout
                                                 ? read_columns(header, kMaxColumns)
                                                 : std::vector<std::string>{};
    if (!header.at_end()) corrupt("delta: trailing bytes in the header");
    check_columns(written, columns_);
    if (np != num_partitions()) {
      corrupt("delta of a store with " + std::to_string(np) + " partitions (this one has " +
              std::to_string(num_partitions()) + ")");
    }
    check_key_type<K>(tag);
  }

  // Everything is decoded and checked into private structures first.
  const std::uint32_t np = num_partitions();
  SharedMap incoming;
  std::vector<StagedLocal<Local>> local(np);
  std::vector<bool> reset(np, false);
  const std::size_t extra = width_ - 1;
  const std::size_t min_entry = 4 + width_ * Moments::kEncodedSize;
  std::vector<Moments> row;
  while (reader.next(record)) {
    ByteReader in(record.value, "numeric aggregate store delta chunk");
    if (const auto pid = partition_of(record.key, kSharedKey, np)) {
      const std::uint32_t n = chunk_count(in, min_entry);
      for (std::uint32_t i = 0; i < n; ++i) {
        const View key = K::decode(in);
        typename SharedMap::accessor entry;
        incoming.insert(entry, key);
        const auto [slot, created] = entry->second.slot(*pid, extra);
        if (!created) corrupt("delta: a slot listed twice");
        slot->partial = Moments::decode(in);
        row.clear();
        decode_more(in, row, extra);
        if (extra > 0) std::copy(row.begin(), row.end(), entry->second.more(slot, extra));
      }
    } else if (const auto reset_pid = partition_of(record.key, kResetPrefix, np)) {
      if (reset[*reset_pid] || !local[*reset_pid].empty()) corrupt("delta: misplaced reset");
      reset[*reset_pid] = true;
    } else if (const auto local_pid = partition_of(record.key, kLocalPrefix, np)) {
      auto& staged = local[*local_pid];
      if (staged.empty()) staged.allocate();
      read_local_chunk<Local>(in, staged, *local_pid, extra);
    } else {
      corrupt("delta: unknown record");
    }
    if (!in.at_end()) corrupt("trailing bytes in a delta chunk");
  }

  const Quiescent quiescent(epoch_, partitions_);
  if (parent != identity_) {
    corrupt("delta " + std::to_string(sequence) +
            " does not follow this store's state (its parent is another snapshot or delta; "
            "this store is at delta " + std::to_string(sequence_) + " of its chain)");
  }
  for (std::uint32_t pid = 0; pid < np; ++pid) {
    if (local[pid].empty()) continue;
    for (std::size_t s = 0; s < Local::kShards; ++s) {
      const std::size_t held = reset[pid] ? 0 : partitions_[pid]->local.shard_size(s);
      if (held + local[pid].tables[s].size() > Local::kMaxPerShard) {
        corrupt("too many local entries in a shard");
      }
    }
  }
  // Nothing below rejects the delta; only memory exhaustion could stop it part way.
  for (const auto& item : incoming) {
    typename SharedMap::accessor entry;
    shared_.insert(entry, item.first);
    for (const Slot& in_slot : item.second) {
      const bool created = entry->second.find(in_slot.partition) == nullptr;
      put(entry->second, in_slot.partition, in_slot.partial,
          extra > 0 ? item.second.more(&in_slot, extra) : nullptr);
      if (created) ++partitions_[in_slot.partition]->published;
    }
  }
  for (std::uint32_t pid = 0; pid < np; ++pid) {
    Local& target = partitions_[pid]->local;
    if (reset[pid]) target.drain();
    if (local[pid].empty()) continue;
    for (std::size_t s = 0; s < Local::kShards; ++s) {
      const auto& table = local[pid].tables[s];
      const Moments* more = local[pid].more[s].data();
      for (std::size_t i = 0; i < table.size(); ++i) {
        target.assign(table.key_at(i), table.value_at(i), extra > 0 ? more + i * extra : nullptr);
      }
    }
  }
  reset_tracking(data, sequence);
}

template <class K>
template <class Staged>
void NumericAggregateStore<K>::install(SharedMap& fresh_shared, std::vector<Staged>& fresh_local) {
  const std::uint32_t np = num_partitions();
  std::vector<std::size_t> published(np, 0);
  for (const auto& item : fresh_shared) {
    for (const Slot& s : item.second) ++published[s.partition];
  }

  const Quiescent quiescent(epoch_, partitions_);
  shared_.swap(fresh_shared);
  for (std::uint32_t pid = 0; pid < np; ++pid) {
    Partition& p = *partitions_[pid];
    p.dirty.clear();  // they point into the old map; the new one is clean
    p.published = published[pid];
    p.local.replace(std::move(fresh_local[pid].tables), std::move(fresh_local[pid].more));
  }
}

template <class K>
struct NumericAggregateStore<K>::Layout {
  std::uint32_t version = 0;
  std::uint32_t partitions = 0;  // the writer's num_partitions
  std::uint32_t key_groups = 0;  // 0: not recorded (layouts 1 to 3)
  bool exported = false;
  std::vector<Section> sections;  // layout 4
  std::size_t bytes = 0;          // the snapshot's

  // At most how many keys the sections `wanted` marks (empty: all) hold, for sizing a
  // map once: what their index says, but never more than the bytes could hold (the
  // counts are only checked as sections are decoded).
  [[nodiscard]] std::size_t keys_bound(const std::vector<char>& wanted) const noexcept {
    std::uint64_t entries = 0;
    for (const Section& section : sections) {
      if (wanted.empty() || wanted[section.group] != 0) entries += section.entries;
    }
    return static_cast<std::size_t>(
        std::min<std::uint64_t>(entries, bytes / (4 + Moments::kEncodedSize)));
  }
};

template <class K>
typename NumericAggregateStore<K>::Layout NumericAggregateStore<K>::read_layout(
    RecordReader& reader, std::size_t bytes) const {
  reader.expect_kind(RecordKind::kNumericAggregateStore);
  RecordView record;
  if (!reader.next(record) || record.key != kHeaderKey) corrupt("missing header record");
  Layout layout;
  layout.bytes = bytes;
  {
    ByteReader header(record.value, "numeric aggregate store snapshot header");
    layout.version = header.u32();
    layout.partitions = header.u32();
    const auto tag = static_cast<std::uint8_t>(header.take(1)[0]);
    if (layout.version != kFullPartialsLayout && layout.version != kLayoutVersion &&
        layout.version != kColumnsLayout && layout.version != kKeyGroupsLayout) {
      corrupt("unsupported layout version " + std::to_string(layout.version));
    }
    check_key_type<K>(tag);
    std::vector<std::string> written;
    if (layout.version == kKeyGroupsLayout) {
      layout.key_groups = header.u32();
      const auto form = static_cast<std::uint8_t>(header.take(1)[0]);
      if (form != kCaptureForm && form != kExportForm) corrupt("unknown snapshot form");
      layout.exported = form == kExportForm;
      written = read_columns(header, kMaxColumns, /*zero_is_unnamed=*/true);
      if (layout.key_groups == 0 || layout.key_groups > kMaxKeyGroups ||
          layout.partitions == 0 || layout.partitions > layout.key_groups) {
        corrupt("a header with " + std::to_string(layout.partitions) + " partitions and " +
                std::to_string(layout.key_groups) + " key groups");
      }
      if (layout.exported) {
        const std::uint32_t n = header.u32();
        if (n > header.remaining() / 4) corrupt("an export header listing too many partitions");
        for (std::uint32_t i = 0; i < n; ++i) {
          if (header.u32() >= layout.partitions) corrupt("an export of an unknown partition");
        }
      }
      if (!header.at_end()) corrupt("trailing bytes in the header");
    } else if (layout.version == kColumnsLayout) {
      written = read_columns(header, kMaxColumns);
    }
    // (layouts 1 to 3 record the writer's partitions too; ids are checked as they come)
    check_columns(written, columns_);
  }
  if (layout.key_groups != 0 && layout.key_groups != key_groups_) {
    throw InvalidArgument("numeric aggregate store snapshot: written by a store of " +
                          std::to_string(layout.key_groups) + " key groups, this store has " +
                          std::to_string(key_groups_) +
                          " (key groups are fixed for the life of a job: create the store "
                          "with key_groups=" + std::to_string(layout.key_groups) + ")");
  }
  if (layout.version != kKeyGroupsLayout) return layout;

  if (!reader.next(record) || record.key != kSectionsKey) corrupt("missing section index");
  ByteReader in(record.value, "numeric aggregate store section index");
  const std::uint32_t n = in.u32();
  if (n > in.remaining() / 16) corrupt("a section index longer than its bytes");
  layout.sections.reserve(n);
  std::uint64_t records = 0;
  for (std::uint32_t i = 0; i < n; ++i) {
    Section section{};
    section.group = in.u32();
    section.records = in.u32();
    section.entries = in.u64();
    if (section.group >= key_groups_ ||
        (i > 0 && section.group <= layout.sections.back().group)) {
      corrupt("a section index not in ascending key group order");
    }
    if (section.records == 0) corrupt("an empty section");
    records += section.records;
    layout.sections.push_back(section);
  }
  if (!in.at_end()) corrupt("trailing bytes in the section index");
  if (records != reader.count() - 2) {
    corrupt("the section index lists " + std::to_string(records) + " records, the snapshot " +
            "holds " + std::to_string(reader.count() - 2));
  }
  return layout;
}

template <class K>
std::size_t NumericAggregateStore<K>::read_shared_chunk(ByteReader& in, std::uint32_t np,
                                                        std::uint32_t group,
                                                        SharedMap& out) const {
  const std::size_t extra = width_ - 1;
  // The shortest entry: an empty bytes key (its u32 length), partial count, one
  // (partition, width Moments) slot.
  const std::size_t min_entry = 4 + 4 + 4 + width_ * Moments::kEncodedSize;
  const std::uint32_t n = chunk_count(in, min_entry);
  std::vector<Moments> row;
  for (std::uint32_t i = 0; i < n; ++i) {
    const View key = K::decode(in);
    check_group(K::hash(key), group, key_groups_);
    const std::uint32_t k = in.u32();
    if (k == 0 || k > np) corrupt("a shared entry with " + std::to_string(k) + " partials");
    typename SharedMap::accessor entry;
    if (!out.insert(entry, key)) corrupt("duplicate shared entry");
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
      const Moments first = Moments::decode(in);
      row.clear();
      decode_more(in, row, extra);
      put(slots, pid, first, row.data());
    }
  }
  return n;
}

template <class K>
template <class Staged>
void NumericAggregateStore<K>::decode_capture(RecordReader& reader, const Layout& layout,
                                              std::uint32_t np, const std::vector<char>& wanted,
                                              SharedMap& shared,
                                              std::vector<Staged>& local) const {
  const std::size_t extra = width_ - 1;
  RecordView record;
  const auto decode_record = [&](std::uint32_t group) -> std::size_t {
    ByteReader in(record.value, "numeric aggregate store snapshot chunk");
    std::size_t n = 0;
    if (record.key == kSharedKey) {
      n = read_shared_chunk(in, np, group, shared);
    } else if (const auto pid = partition_of(record.key, kLocalPrefix, np)) {
      n = read_local_chunk<Local>(in, local[*pid], *pid, extra, group, key_groups_);
    } else {
      corrupt("unknown record");
    }
    if (!in.at_end()) corrupt("trailing bytes in a chunk");
    return n;
  };
  if (layout.version == kKeyGroupsLayout) {
    shared.rehash(layout.keys_bound(wanted));  // no regrowth while decoding
    for (const Section& section : layout.sections) {
      const bool decode = wanted.empty() || wanted[section.group] != 0;
      std::uint64_t entries = 0;
      for (std::uint32_t r = 0; r < section.records; ++r) {
        (void)reader.next(record);  // read_layout matched the index to the record count
        if (decode) entries += decode_record(section.group);
      }
      if (decode && entries != section.entries) {
        corrupt("the section of key group " + std::to_string(section.group) + " holds " +
                std::to_string(entries) + " entries, its index says " +
                std::to_string(section.entries));
      }
    }
    return;
  }
  while (reader.next(record)) (void)decode_record(kAnyGroup);
  if (layout.version == kFullPartialsLayout) {
    // Layout 1 local tables held each partition's full partial of a key, ahead of (or
    // equal to) its published slot: they become the slot, so a key lives in one place.
    for (std::uint32_t pid = 0; pid < np; ++pid) {
      for (auto& table : local[pid].tables) {
        for (std::size_t i = 0; i < table.size(); ++i) {
          typename SharedMap::accessor entry;
          shared.insert(entry, table.key_at(i));
          put(entry->second, pid, table.value_at(i), nullptr);  // layout 1: one column
        }
        table.release();
      }
    }
  }
}

template <class K>
template <class Add>
void NumericAggregateStore<K>::decode_export(RecordReader& reader, const Layout& layout,
                                             const std::vector<char>& wanted, Add&& add) const {
  std::vector<Moments> row(width_);
  RecordView record;
  for (const Section& section : layout.sections) {
    const bool decode = wanted.empty() || wanted[section.group] != 0;
    std::uint64_t entries = 0;
    for (std::uint32_t r = 0; r < section.records; ++r) {
      (void)reader.next(record);  // read_layout matched the index to the record count
      if (!decode) continue;
      if (record.key != kMergedKey) corrupt("unknown record in an export");
      ByteReader in(record.value, "numeric aggregate store export chunk");
      const std::uint32_t n = chunk_count(in, 4 + width_ * Moments::kEncodedSize);
      for (std::uint32_t i = 0; i < n; ++i) {
        const View key = K::decode(in);
        check_group(K::hash(key), section.group, key_groups_);
        for (Moments& m : row) m = Moments::decode(in);
        add(key, row.data());
      }
      if (!in.at_end()) corrupt("trailing bytes in a chunk");
      entries += n;
    }
    if (decode && entries != section.entries) {
      corrupt("the section of key group " + std::to_string(section.group) + " holds " +
              std::to_string(entries) + " entries, its index says " +
              std::to_string(section.entries));
    }
  }
}

template <class K>
void NumericAggregateStore<K>::restore(std::string_view data) {
  RecordReader reader(data);
  const Layout layout = read_layout(reader, data.size());
  if (layout.exported) {
    restore_from({data}, std::nullopt);
    return;
  }
  const std::uint32_t np = num_partitions();
  SharedMap fresh_shared;
  std::vector<StagedLocal<Local>> fresh_local(np);
  for (auto& staged : fresh_local) staged.allocate();
  decode_capture(reader, layout, np, {}, fresh_shared, fresh_local);
  install(fresh_shared, fresh_local);
  identity_ = record_identity(data);
  sequence_ = 0;
}

template <class K>
void NumericAggregateStore<K>::restore_from(
    const std::vector<std::string_view>& artifacts,
    const std::optional<std::vector<std::uint32_t>>& partitions) {
  const std::uint32_t np = num_partitions();
  std::vector<char> listed(np, partitions ? 0 : 1);
  if (partitions) {
    for (const std::uint32_t pid : *partitions) {
      check_partition(pid);
      listed[pid] = 1;
    }
  }
  std::vector<char> wanted(key_groups_);
  for (std::uint32_t g = 0; g < key_groups_; ++g) {
    wanted[g] = listed[owner_of_group(g, np, key_groups_)];
  }
  const std::size_t extra = width_ - 1;
  SharedMap fresh;
  // Older layouts have no sections: their keys of other owners are dropped here.
  const auto add = [&](View key, const Moments* row) {
    const std::uint32_t owner = partition_of<K>(key, np, key_groups_);
    if (listed[owner] == 0) return;
    typename SharedMap::accessor entry;
    fresh.insert(entry, key);
    Slot* slot = entry->second.slot(owner, extra).first;
    slot->partial.merge(row[0]);
    if (extra > 0) {
      Moments* into = entry->second.more(slot, extra);
      for (std::size_t c = 0; c < extra; ++c) into[c].merge(row[1 + c]);
    }
  };
  for (const std::string_view data : artifacts) {
    RecordReader reader(data);
    const Layout layout = read_layout(reader, data.size());
    fresh.rehash(fresh.size() + layout.keys_bound(wanted));
    if (layout.exported) {
      decode_export(reader, layout, wanted, add);
      continue;
    }
    const std::uint32_t writer = layout.partitions;
    if (writer == 0 || writer > kMaxPartitions) {
      corrupt("a header with " + std::to_string(writer) + " partitions");
    }
    // The writer's state, restored as restore() would (wanted sections only), merges key
    // by key as repartitioned() merges; its routing is never used.
    NumericAggregateStore staged(writer, policy_, columns_, std::max(writer, key_groups_));
    SharedMap shared;
    std::vector<StagedLocal<Local>> local(writer);
    for (auto& part : local) part.allocate();
    decode_capture(reader, layout, writer, wanted, shared, local);
    staged.install(shared, local);
    const Quiescent quiescent(staged.epoch_, staged.partitions_);
    staged.merge_partials({}, [](std::size_t) {}, add);
  }
  install_published(fresh);
}

template <class K>
void NumericAggregateStore<K>::install_published(SharedMap& fresh_shared) {
  std::vector<StagedLocal<Local>> empty(num_partitions());
  for (auto& staged : empty) staged.allocate();
  install(fresh_shared, empty);
  identity_ = 0;  // no capture's state
  sequence_ = 0;
}

template <class K>
void NumericAggregateStore<K>::restore_columns(const std::vector<std::string_view>& parts) {
  if (parts.size() != width_) {
    corrupt(std::to_string(parts.size()) + " column snapshots for a store of " +
            std::to_string(width_) + " value columns");
  }
  const std::uint32_t np = num_partitions();
  const std::size_t extra = width_ - 1;
  SharedMap fresh_shared;
  std::vector<StagedLocal<Local>> fresh_local(np);
  for (auto& staged : fresh_local) staged.allocate();
  // Column c of a staged row: column 0 is the entry's (or slot's) own partial.
  const auto at = [](Moments& first, Moments* more, std::size_t c) -> Moments& {
    return c == 0 ? first : more[c - 1];
  };
  for (std::size_t c = 0; c < width_; ++c) {
    NumericAggregateStore part(np, policy_, {}, key_groups_);
    part.restore(parts[c]);  // every check a restore makes, layouts 1 and 2 alike
    for (const auto& item : part.shared_) {
      typename SharedMap::accessor entry;
      fresh_shared.insert(entry, item.first);
      for (const Slot& in_slot : item.second) {
        Slot* slot = entry->second.slot(in_slot.partition, extra).first;
        at(slot->partial, extra > 0 ? entry->second.more(slot, extra) : nullptr, c) =
            in_slot.partial;
      }
    }
    for (std::uint32_t pid = 0; pid < np; ++pid) {
      StagedLocal<Local>& staged = fresh_local[pid];
      for (std::size_t s = 0; s < Local::kShards; ++s) {
        const auto& from = part.partitions_[pid]->local.shard(s);
        auto& table = staged.tables[s];
        auto& more = staged.more[s];
        for (std::size_t i = 0; i < from.size(); ++i) {
          const auto [idx, inserted] = table.emplace(from.key_at(i), from.hash_at(i));
          if (table.size() > Local::kMaxPerShard) corrupt("too many local entries in a shard");
          if (inserted && extra > 0) more.resize((idx + 1) * extra);
          at(table.value_at(idx), extra > 0 ? more.data() + idx * extra : nullptr, c) =
              from.value_at(i);
        }
      }
    }
  }
  install(fresh_shared, fresh_local);
  identity_ = 0;
  sequence_ = 0;
}

template <class K>
std::unique_ptr<NumericAggregateStore<K>> NumericAggregateStore<K>::repartitioned(
    std::uint32_t partitions) const {
  auto out = std::make_unique<NumericAggregateStore>(partitions, policy_, columns_, key_groups_);
  repartition_into(*out);
  return out;
}

template <class K>
void NumericAggregateStore<K>::repartition_into(NumericAggregateStore& target) const {
  if (target.columns_ != columns_ || target.policy_ != policy_) {
    throw InvalidArgument("repartition: the target store has other value columns or another "
                          "nan_policy");
  }
  const std::uint32_t partitions = target.num_partitions();
  const std::uint32_t key_groups = target.key_groups_;
  // Staged without the target's locks, installed after this store's are released: two
  // stores' locks are never held at once, so no order between stores can deadlock.
  SharedMap fresh;
  std::vector<std::size_t> published(partitions, 0);
  {
    const Quiescent quiescent(epoch_, partitions_);
    merge_partials(
        {}, [&](std::size_t bound) { fresh.rehash(bound); },  // no regrowth
        [&](View key, const Moments* total) {
          const std::uint32_t owner = partition_of<K>(key, partitions, key_groups);
          typename SharedMap::accessor entry;
          fresh.insert(entry, key);
          put(entry->second, owner, total[0], total + 1);
          ++published[owner];
        });
  }

  const Quiescent quiescent(target.epoch_, target.partitions_);
  const bool empty = target.shared_.empty() &&
                     std::all_of(target.partitions_.begin(), target.partitions_.end(),
                                 [](const auto& p) { return p->local.size() == 0; });
  if (!empty) throw InvalidArgument("repartition: the target store must be empty");
  target.shared_.swap(fresh);
  for (std::uint32_t pid = 0; pid < partitions; ++pid) {
    target.partitions_[pid]->published = published[pid];
  }
  target.identity_ = 0;  // no capture's state
  target.sequence_ = 0;
}

template <class K>
template <class Reserve, class Emit>
void NumericAggregateStore<K>::merge_partials(const std::vector<char>& listed, Reserve&& reserve,
                                              Emit&& emit) const {
  const std::size_t extra = width_ - 1;
  const auto included = [&](std::uint32_t pid) { return listed.empty() || listed[pid] != 0; };

  // Every local entry by key: a chain of (partition, Ref) links in ascending partition
  // order, found through one flat table (a node-based map costs an allocation a key).
  struct Link {
    std::uint32_t partition;
    Ref ref;
    std::size_t next;
  };
  struct Chain {
    std::size_t head = kNoLink;
    std::size_t tail = kNoLink;
    bool merged = false;  // the key also has published slots, and went out with them
  };
  FlatTable<K, Chain> locals;
  std::vector<Link> links;
  for (std::uint32_t pid = 0; pid < num_partitions(); ++pid) {
    if (!included(pid)) continue;
    const Local& local = partitions_[pid]->local;
    for (std::size_t s = 0; s < Local::kShards; ++s) {
      const auto& table = local.shard(s);
      for (std::size_t i = 0; i < table.size(); ++i) {
        const auto ref = static_cast<Ref>((s << Local::kIndexBits) | i);
        Chain& chain = locals.find_or_insert(table.key_at(i), table.hash_at(i));
        (chain.head == kNoLink ? chain.head : links[chain.tail].next) = links.size();
        chain.tail = links.size();
        links.push_back(Link{pid, ref, kNoLink});
      }
    }
  }

  reserve(shared_.size() + locals.size());  // at most this many keys
  std::vector<Moments> total(width_);
  std::vector<Moments> share(width_);
  // One source partition's share of a key (its slot, if any, with its local entry, if
  // any, merged in) merged into the key's total.
  const auto add_share = [&](const Slots* slots, const Slot* slot, std::uint32_t pid,
                             const Ref* ref) {
    const Local& local = partitions_[pid]->local;
    for (std::size_t c = 0; c < width_; ++c) {
      share[c] = slot == nullptr ? Moments{}
                 : c == 0        ? slot->partial
                                 : slots->more(slot, extra)[c - 1];
      if (ref != nullptr) {
        share[c].merge(c == 0 ? local.value_at(*ref) : local.more_at(*ref)[c - 1]);
      }
      total[c].merge(share[c]);
    }
  };
  const auto flush = [&](View key) {
    emit(key, static_cast<const Moments*>(total.data()));
    std::fill(total.begin(), total.end(), Moments{});
  };

  for (const auto& item : shared_) {
    const Slots& slots = item.second;
    const View key = K::view_of(item.first);
    const std::size_t found = locals.find_index(key);
    std::size_t link = kNoLink;
    if (found != decltype(locals)::npos) {
      locals.value_at(found).merged = true;
      link = locals.value_at(found).head;
    }
    // Both lists ascend by partition: walk them together.
    constexpr std::uint32_t kNone = std::numeric_limits<std::uint32_t>::max();
    const Slot* slot = slots.begin();
    bool any = false;
    while (true) {
      while (slot != slots.end() && !included(slot->partition)) ++slot;
      if (slot == slots.end() && link == kNoLink) break;
      const std::uint32_t next_slot = slot != slots.end() ? slot->partition : kNone;
      const std::uint32_t next_local = link != kNoLink ? links[link].partition : kNone;
      const std::uint32_t pid = std::min(next_slot, next_local);
      add_share(&slots, next_slot == pid ? slot : nullptr, pid,
                next_local == pid ? &links[link].ref : nullptr);
      any = true;
      if (next_slot == pid) ++slot;
      if (next_local == pid) link = links[link].next;
    }
    if (any) flush(key);
  }
  for (std::size_t i = 0; i < locals.size(); ++i) {
    const Chain& chain = locals.value_at(i);
    if (chain.merged) continue;
    for (std::size_t link = chain.head; link != kNoLink; link = links[link].next) {
      add_share(nullptr, nullptr, links[link].partition, &links[link].ref);
    }
    // The key as the source partition's table holds it (`locals` goes with this call).
    const Link& first = links[chain.head];
    flush(partitions_[first.partition]->local.key_at(first.ref));
  }
}

template <class K>
std::vector<std::uint32_t> NumericAggregateStore<K>::partitions_holding(View key) const {
  const Quiescent quiescent(epoch_, partitions_);
  std::vector<std::uint32_t> published;
  {
    typename SharedMap::const_accessor entry;
    if (shared_.find(entry, key)) {
      for (const Slot& s : entry->second) published.push_back(s.partition);
    }
  }
  const std::uint64_t hash = K::hash(key);
  std::vector<std::uint32_t> out;
  for (std::uint32_t pid = 0; pid < num_partitions(); ++pid) {
    const bool in_shared = std::find(published.begin(), published.end(), pid) != published.end();
    const auto& table = partitions_[pid]->local.shard(Local::shard_of(hash));
    if (in_shared || table.find_index(key, hash) != Local::Table::npos) out.push_back(pid);
  }
  return out;
}

template <class K>
std::size_t NumericAggregateStore<K>::memory_bytes() const {
  std::size_t total = sizeof(*this);
  for (const auto& p : partitions_) {
    // The slots themselves are counted with the shared map's nodes below.
    const std::lock_guard<std::mutex> lock(p->mutex);
    total += p->local.memory_bytes() + p->dirty.capacity() * sizeof(Node*);
  }
  const ExclusiveEpoch epoch(epoch_);
  // TBB node: bucket link + per-node rw lock + the (key, slots) pair; plus each bucket's
  // pointer and lock. Slot vectors and long string keys count their heap capacity.
  constexpr std::size_t kNodeOverhead = 2 * sizeof(void*);
  constexpr std::size_t kBucket = 2 * sizeof(void*);
  total += shared_.bucket_count() * kBucket;
  for (const auto& item : shared_) {
    total += kNodeOverhead + sizeof(item) + item.second.heap_bytes(width_ - 1);
    if constexpr (std::is_same_v<typename K::Key, std::string>) {
      if (item.first.capacity() > 15) total += item.first.capacity() + 1;
    }
  }
  return total;
}

template class NumericAggregateStore<Int64Keys>;
template class NumericAggregateStore<BytesKeys>;

}  // namespace streamstate
