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
struct Moments {
  std::uint64_t count = 0;
  double sum = 0.0;
  double min = std::numeric_limits<double>::infinity();
  double max = -std::numeric_limits<double>::infinity();
  double shift = 0.0;  // K
  double dsum = 0.0;   // sum of (x - K)
  double dsq = 0.0;    // sum of (x - K)^2

  static constexpr std::size_t kEncodedSize = 8 * 7;

  void add(double x) noexcept {
    if (count == 0) shift = x;
    const double d = x - shift;
    ++count;
    sum += x;
    dsum += d;
    dsq += d * d;
    // NaN sticks once seen, whichever side it arrives on.
    if (x < min || std::isnan(x)) min = std::isnan(min) ? min : x;
    if (x > max || std::isnan(x)) max = std::isnan(max) ? max : x;
  }

  [[nodiscard]] double mean() const noexcept {
    return count == 0 ? std::numeric_limits<double>::quiet_NaN()
                      : shift + dsum / static_cast<double>(count);
  }

  // Sum of squared deviations from the mean.
  [[nodiscard]] double m2() const noexcept {
    if (count == 0) return 0.0;
    const double m2 = dsq - dsum * dsum / static_cast<double>(count);
    return m2 < 0.0 ? 0.0 : m2;  // rounding can dip a hair below zero for constant data
  }

  // Sample variance (ddof = 1); NaN below two values.
  [[nodiscard]] double var() const noexcept {
    return count < 2 ? std::numeric_limits<double>::quiet_NaN()
                     : m2() / static_cast<double>(count - 1);
  }
  [[nodiscard]] double stddev() const noexcept { return std::sqrt(var()); }

  // Chan's parallel merge. The difference of the two means is taken as (shift_b - shift_a)
  // + (dsum_b/n_b - dsum_a/n_a): the shifts are data values, so their difference is exact
  // or nearly, and the small corrections keep full precision. Taking mean_b - mean_a
  // directly would round both means to the ulp of the data's magnitude (1.2e-7 at 1e9)
  // and, for 1e9 + 1e-3 * noise, cost ~1e-4 of the variance. The merged partial keeps
  // whichever shift lies nearer the merged mean (a data value, never a rounded mean), so
  // later adds keep the small-deviation property.
  void merge(const Moments& other) noexcept {
    if (other.count == 0) return;
    if (count == 0) {
      *this = other;
      return;
    }
    const double n_a = static_cast<double>(count);
    const double n_b = static_cast<double>(other.count);
    const double n = n_a + n_b;
    const double shift_gap = other.shift - shift;
    const double delta = shift_gap + (other.dsum / n_b - dsum / n_a);
    const double merged_m2 = m2() + other.m2() + delta * delta * (n_a * n_b / n);
    // sum of (x - K) over both partials, for K = this shift or the other's.
    const double dsum_here = dsum + other.dsum + n_b * shift_gap;
    const double dsum_there = dsum + other.dsum - n_a * shift_gap;
    count += other.count;
    sum += other.sum;
    if (other.min < min || std::isnan(other.min)) min = std::isnan(min) ? min : other.min;
    if (other.max > max || std::isnan(other.max)) max = std::isnan(max) ? max : other.max;
    if (std::fabs(dsum_there) < std::fabs(dsum_here)) {
      shift = other.shift;
      dsum = dsum_there;
    } else {
      dsum = dsum_here;
    }
    // Stored so that m2() = dsq - dsum^2 / count gives back merged_m2.
    dsq = merged_m2 + dsum * dsum / n;
  }

  void encode(std::string& out) const {
    put_u64(out, count);
    put_f64(out, sum);
    put_f64(out, min);
    put_f64(out, max);
    put_f64(out, shift);
    put_f64(out, dsum);
    put_f64(out, dsq);
  }

  [[nodiscard]] static Moments decode(ByteReader& in) {
    Moments m;
    m.count = in.u64();
    m.sum = in.f64();
    m.min = in.f64();
    m.max = in.f64();
    m.shift = in.f64();
    m.dsum = in.f64();
    m.dsq = in.f64();
    return m;
  }
};

}  // namespace streamstate
