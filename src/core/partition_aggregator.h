// The partition-local fold: one writer folds batches of (key, value) rows into per-key
// Moments in a flat hash table, with no locks and no allocation per row, and remembers
// which keys changed so a publish pushes only those.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "core/byte_io.h"
#include "core/flat_table.h"
#include "core/stats.h"

namespace streamstate {

// Key flavours of the numeric store. `View` is what a fold receives and what lookups take;
// `Key` is the owned form the shared map stores; `KeyColumn` is how result_columns() hands
// keys out.
struct Int64Keys {
  using Key = std::int64_t;
  using View = std::int64_t;
  using Table = Int64FlatTable<Moments>;
  struct KeyColumn {
    std::vector<std::int64_t> keys;
    void reserve(std::size_t n) { keys.reserve(n); }
    void push_back(View k) { keys.push_back(k); }
    [[nodiscard]] std::size_t size() const noexcept { return keys.size(); }
  };
  static constexpr std::uint8_t kTag = 0;
  static constexpr std::string_view kName = "int64";

  static void encode(std::string& out, View k) { put_u64(out, static_cast<std::uint64_t>(k)); }
  [[nodiscard]] static View decode(ByteReader& in) { return static_cast<std::int64_t>(in.u64()); }
  [[nodiscard]] static std::size_t encoded_size(View /*k*/) noexcept { return 8; }
  [[nodiscard]] static View view_of(const Key& k) noexcept { return k; }
  [[nodiscard]] static std::uint64_t hash(View k) noexcept {
    return mix64(static_cast<std::uint64_t>(k));
  }
  [[nodiscard]] static bool less(View a, View b) noexcept { return a < b; }
};

struct BytesKeys {
  using Key = std::string;
  using View = std::string_view;
  using Table = BytesFlatTable<Moments>;
  // All keys back to back plus end offsets: one allocation instead of one per key.
  struct KeyColumn {
    std::string bytes;
    std::vector<std::size_t> ends;
    void reserve(std::size_t n) { ends.reserve(n); }
    void push_back(View k) {
      bytes.append(k);
      ends.push_back(bytes.size());
    }
    [[nodiscard]] std::size_t size() const noexcept { return ends.size(); }
  };
  static constexpr std::uint8_t kTag = 1;
  static constexpr std::string_view kName = "bytes";

  static void encode(std::string& out, View k) {
    put_u32(out, static_cast<std::uint32_t>(k.size()));
    out.append(k);
  }
  [[nodiscard]] static View decode(ByteReader& in) { return in.take(in.u32()); }
  [[nodiscard]] static std::size_t encoded_size(View k) noexcept { return 4 + k.size(); }
  [[nodiscard]] static View view_of(const Key& k) noexcept { return k; }
  [[nodiscard]] static std::uint64_t hash(View k) noexcept { return hash_bytes(k); }
  [[nodiscard]] static bool less(View a, View b) noexcept { return a < b; }
};

// Adds a value known not to be NaN: the same result as Moments::add, minus the NaN tests
// (a NaN already in min/max stays, because every comparison with it is false).
inline void add_number(Moments& m, double x) noexcept {
  if (m.count == 0) m.shift = x;
  const double d = x - m.shift;
  ++m.count;
  m.sum += x;
  m.dsum += d;
  m.dsq += d * d;
  m.min = x < m.min ? x : m.min;
  m.max = x > m.max ? x : m.max;
}

// True when any of the n values is NaN (one vectorisable pass, cheap next to the fold).
[[nodiscard]] bool any_nan(const double* values, std::size_t n) noexcept;

template <class K>
class PartitionAggregator {
 public:
  using View = typename K::View;
  using Table = typename K::Table;

  // Folds n rows. With NanPolicy::kRaise a NaN anywhere in the batch throws InvalidArgument
  // before any row is folded; kSkip ignores NaN rows entirely (the key is not created);
  // kPropagate folds them (the key's sum/mean/min/max/var become NaN).
  void fold(const View* keys, const double* values, std::size_t n, NanPolicy policy);

  // Appends the indices (into table()) of entries changed since the last forget_changes().
  void collect_changes(std::vector<std::uint64_t>& out) const {
    out.reserve(out.size() + pending());
    for (std::size_t w = 0; w < changed_.size(); ++w) {
      for (std::uint64_t bits = changed_[w]; bits != 0; bits &= bits - 1) {
        out.push_back(w * 64 + static_cast<std::uint64_t>(std::countr_zero(bits)));
      }
    }
    for (std::size_t i = watermark_; i < table_.size(); ++i) out.push_back(i);
  }

  // Marks everything as published. Call only once the changes are safely pushed:
  // publishing the same partial twice is harmless, losing one is not.
  void forget_changes() {
    watermark_ = table_.size();
    changed_.assign((watermark_ + 63) / 64, 0);
  }

  // Entries changed since the last forget_changes (new keys plus updated ones).
  [[nodiscard]] std::size_t pending() const noexcept;
  [[nodiscard]] std::size_t size() const noexcept { return table_.size(); }
  [[nodiscard]] std::size_t memory_bytes() const noexcept {
    return table_.memory_bytes() + changed_.capacity() * sizeof(std::uint64_t);
  }
  [[nodiscard]] const Table& table() const noexcept { return table_; }
  [[nodiscard]] View key_at(std::size_t i) const noexcept { return table_.key_at(i); }

  // Replaces the contents (restore); every entry counts as changed, so the next publish
  // re-pushes them all, which is idempotent.
  void replace(Table&& table) noexcept {
    table_ = std::move(table);
    changed_.clear();
    watermark_ = 0;
  }

 private:
  template <bool kSkipNan>
  void fold_numbers(const View* keys, const double* values, std::size_t n);
  void fold_with_nan(const View* keys, const double* values, std::size_t n);

  Table table_;
  // Entries [0, watermark_) existed at the last publish; a set bit marks one changed since.
  // Entries from watermark_ on are new and implicitly changed.
  std::vector<std::uint64_t> changed_;
  std::size_t watermark_ = 0;
};

extern template class PartitionAggregator<Int64Keys>;
extern template class PartitionAggregator<BytesKeys>;

}  // namespace streamstate
