// The numeric partial aggregate shared by the aggregate store and the spilling aggregator:
// count, sum, min, max and the moments for mean and sample variance, mergeable in any order.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <string_view>

#include "core/byte_io.h"

namespace streamstate {

// What a fold does with NaN values.
enum class NanPolicy : std::uint8_t {
  kSkip = 0,       // ignore the row (pandas' default for sum/mean/var)
  kPropagate = 1,  // the group's sum, mean, min, max and var become NaN
  kRaise = 2,      // reject the whole batch before folding any of it
};

// Variance is kept as shifted sums: with K the first value a partial saw, it accumulates
// sum(x - K) and sum((x - K)^2). Adding a value costs no division (unlike Welford), and
// because K sits inside the data the squares stay at the scale of the spread, not of the
// magnitude: for 1e9 + noise this keeps ~1e-12 relative accuracy where a one-pass sum of
// squares loses every digit. Partials merge with Chan et al.'s parallel formula.
//
// The extremes, so that no result depends on the order of adds and merges:
// - Infinities and NaN are never folded into the shifted sums (inf - inf would turn them
//   into NaN). min and max remember them, and the results follow numpy: NaN anywhere (the
//   propagate policy) makes everything NaN; +inf and -inf together make sum and mean NaN;
//   one sign of infinity makes sum and mean that infinity; any infinity makes var NaN.
// - A partial whose values reach kHuge in magnitude (1e308 - (-1e308) overflows, so does
//   (1e155)^2) keeps its deviation sums in units of kScale (kScale^2 for dsq): they cannot
//   overflow, and bits lost below 2^-422 are far below the rounding of values >= 2^400.
//   `sum` stays in plain units; where the running sum overflows it is recomputed from the
//   scaled sums, so it is infinite only when the true sum is. The mode needs no flag in
//   memory: min and max say whether a value reached kHuge.
// - Below kHuge nothing can overflow (|x - K| < 2^401, and 2^64 squares of that fit), so
//   the common case pays two comparisons and nothing else.
struct Moments {
  std::uint64_t count = 0;
  double sum = 0.0;
  double min = std::numeric_limits<double>::infinity();
  double max = -std::numeric_limits<double>::infinity();
  double shift = 0.0;  // K
  double dsum = 0.0;   // sum of (x - K), times kScale when scaled()
  double dsq = 0.0;    // sum of (x - K)^2, times kScale^2 when scaled()

  static constexpr std::size_t kEncodedSize = 8 * 7;
  static constexpr double kHuge = 0x1p400;
  static constexpr double kScale = 0x1p-600;
  static constexpr double kUnscale = 0x1p600;
  // Set in the encoded count of a scaled partial, so a partial encoded before scaling
  // existed (plain units at any magnitude) is told apart and converted on decode.
  static constexpr std::uint64_t kScaledFlag = std::uint64_t{1} << 63;

  // Every value seen is finite and below kHuge in magnitude (true when empty): the plain
  // representation, where nothing can overflow.
  [[nodiscard]] bool ordinary() const noexcept { return min > -kHuge && max < kHuge; }
  [[nodiscard]] bool has_nan() const noexcept { return std::isnan(min) || std::isnan(max); }
  // A NaN or an infinity was seen: sum and mean are fixed by which, var is NaN.
  [[nodiscard]] bool has_non_finite() const noexcept {
    return has_nan() || max == std::numeric_limits<double>::infinity() ||
           min == -std::numeric_limits<double>::infinity();
  }
  // Finite values of which one reached kHuge: the deviation sums are in scaled units.
  [[nodiscard]] bool scaled() const noexcept { return !ordinary() && !has_non_finite(); }

  // The fold step when `lo`/`hi` (min and max including x) show x and the partial ordinary.
  void add_ordinary(double x, double lo, double hi) noexcept {
    if (count == 0) shift = x;
    const double d = x - shift;
    ++count;
    sum += x;
    dsum += d;
    dsq += d * d;
    min = lo;
    max = hi;
  }

  // Any value, NaN included.
  void add(double x) noexcept {
    const double lo = x < min ? x : min;
    const double hi = x > max ? x : max;
    if (lo > -kHuge && hi < kHuge && !std::isnan(x)) [[likely]] {
      add_ordinary(x, lo, hi);
    } else {
      add_extreme(x);
    }
  }

  // A NaN, an infinity or a huge value, or any value into a partial holding one.
  void add_extreme(double x) noexcept;

  [[nodiscard]] double mean() const noexcept {
    if (count == 0) return std::numeric_limits<double>::quiet_NaN();
    const double n = static_cast<double>(count);
    if (ordinary()) return clamp_to_range(shift + dsum / n);
    if (has_non_finite()) return sum;  // NaN or the one infinity, exactly as the sum
    return clamp_to_range((shift * kScale + dsum / n) * kUnscale);
  }

  // Sum of squared deviations from the mean (infinite when it overflows a double).
  [[nodiscard]] double m2() const noexcept {
    if (has_non_finite()) return std::numeric_limits<double>::quiet_NaN();
    return scaled() ? m2_in_units() * kUnscale * kUnscale : m2_in_units();
  }

  // Sample variance (ddof = 1); NaN below two values.
  [[nodiscard]] double var() const noexcept {
    if (count < 2 || has_non_finite()) return std::numeric_limits<double>::quiet_NaN();
    const double v = m2_in_units() / static_cast<double>(count - 1);
    // Unscaled in two steps: kScale^-2 is beyond the range of a double.
    return scaled() ? v * kUnscale * kUnscale : v;
  }
  [[nodiscard]] double stddev() const noexcept { return std::sqrt(var()); }

  void merge(const Moments& other) noexcept {
    if (other.count == 0) return;
    if (count == 0) {
      *this = other;
      return;
    }
    if (ordinary() && other.ordinary()) [[likely]] {
      merge_shifted(other);
      sum += other.sum;
      min = other.min < min ? other.min : min;
      max = other.max > max ? other.max : max;
    } else {
      merge_extreme(other);
    }
  }

  void encode(std::string& out) const {
    char bytes[kEncodedSize];
    encode_to(bytes);
    out.append(bytes, kEncodedSize);
  }
  // The same kEncodedSize bytes at `out` (a capture writing entries in place).
  void encode_to(char* out) const noexcept {
    store_u64(out, scaled() ? count | kScaledFlag : count);
    store_f64(out + 8, sum);
    store_f64(out + 16, min);
    store_f64(out + 24, max);
    store_f64(out + 32, shift);
    store_f64(out + 40, dsum);
    store_f64(out + 48, dsq);
  }

  // Throws CorruptDataError (through `in`) when truncated or when the scaled flag
  // contradicts min and max.
  [[nodiscard]] static Moments decode(ByteReader& in);

 private:
  [[nodiscard]] double m2_in_units() const noexcept {
    if (count == 0) return 0.0;
    const double m2 = dsq - dsum * dsum / static_cast<double>(count);
    return m2 < 0.0 ? 0.0 : m2;  // rounding can dip a hair below zero for constant data
  }

  // Rounding may step a hair outside the data; numpy's mean does not either.
  [[nodiscard]] double clamp_to_range(double m) const noexcept {
    return m < min ? min : (m > max ? max : m);
  }

  // Chan's parallel merge of count, shift, dsum and dsq, both partials in the same units.
  // The difference of the two means is taken as (shift_b - shift_a) + (dsum_b/n_b -
  // dsum_a/n_a): the shifts are data values, so their difference is exact or nearly, and
  // the small corrections keep full precision. Taking mean_b - mean_a directly would round
  // both means to the ulp of the data's magnitude (1.2e-7 at 1e9) and, for 1e9 + 1e-3 *
  // noise, cost ~1e-4 of the variance. The merged partial keeps whichever shift lies
  // nearer the merged mean (a data value, never a rounded mean), so later adds keep the
  // small-deviation property. `unit` is what the shifts are multiplied by to be in the
  // units of dsum.
  void merge_shifted(const Moments& other, double unit = 1.0) noexcept {
    const double n_a = static_cast<double>(count);
    const double n_b = static_cast<double>(other.count);
    const double n = n_a + n_b;
    const double shift_gap = other.shift * unit - shift * unit;
    const double delta = shift_gap + (other.dsum / n_b - dsum / n_a);
    const double merged_m2 = m2_in_units() + other.m2_in_units() + delta * delta * (n_a * n_b / n);
    // sum of (x - K) over both partials, for K = this shift or the other's.
    const double dsum_here = dsum + other.dsum + n_b * shift_gap;
    const double dsum_there = dsum + other.dsum - n_a * shift_gap;
    count += other.count;
    if (std::fabs(dsum_there) < std::fabs(dsum_here)) {
      shift = other.shift;
      dsum = dsum_there;
    } else {
      dsum = dsum_here;
    }
    // Stored so that m2_in_units() = dsq - dsum^2 / count gives back merged_m2.
    dsq = merged_m2 + dsum * dsum / n;
  }

  // Brings an ordinary partial's deviation sums into scaled units.
  void rescale() noexcept {
    dsum *= kScale;
    dsq = dsq * kScale * kScale;
  }

  // Either side holds a NaN, an infinity or a huge value.
  void merge_extreme(const Moments& other) noexcept;
};

}  // namespace streamstate
