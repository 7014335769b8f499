#include "core/stats.h"

#include "core/errors.h"

namespace streamstate {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

}  // namespace

void Moments::add_extreme(double x) noexcept {
  // A partial of one value is exact in any units (its deviation sums are zero), so the
  // rare cases reuse the merge instead of repeating its case analysis.
  Moments one;
  one.count = 1;
  one.sum = x;
  one.min = x;
  one.max = x;
  one.shift = x;
  merge(one);
}

void Moments::merge_extreme(const Moments& other) noexcept {
  const bool nan = has_nan() || other.has_nan();
  const double lo = nan ? kNaN : (other.min < min ? other.min : min);
  const double hi = nan ? kNaN : (other.max > max ? other.max : max);
  if (nan || lo == -kInf || hi == kInf) {
    // Exact arithmetic, as numpy's when nothing finite overflows: the finite values do
    // not matter next to an infinity, opposite infinities are undefined. The shifted sums
    // are left as they are: no result reads them any more.
    count += other.count;
    min = lo;
    max = hi;
    sum = (nan || (lo == -kInf && hi == kInf)) ? kNaN : (hi == kInf ? kInf : -kInf);
    return;
  }
  // Both finite, at least one huge: merge in scaled units.
  Moments theirs = other;
  if (!theirs.scaled()) theirs.rescale();
  if (!scaled()) rescale();
  const double running = sum + other.sum;
  merge_shifted(theirs, kScale);
  min = lo;
  max = hi;
  // The running sum overflows for 1e308 + 1e308 - 1e308 in that order; the scaled sums
  // give the true total, infinite only when that is beyond a double.
  sum = std::isfinite(running)
            ? running
            : (static_cast<double>(count) * (shift * kScale) + dsum) * kUnscale;
}

Moments Moments::decode(ByteReader& in) {
  Moments m;
  const std::uint64_t raw_count = in.u64();
  m.count = raw_count & ~kScaledFlag;
  m.sum = in.f64();
  m.min = in.f64();
  m.max = in.f64();
  m.shift = in.f64();
  m.dsum = in.f64();
  m.dsq = in.f64();
  const bool flagged = (raw_count & kScaledFlag) != 0;
  if (flagged && !m.scaled()) {
    throw CorruptDataError("moments: scaled deviation sums for values below the scaling limit");
  }
  if (!flagged && m.scaled()) {
    // Encoded before huge values were scaled: plain units, possibly already overflowed
    // (then nothing is recoverable, and the results say inf or NaN as they did).
    m.rescale();
    if (!std::isfinite(m.sum)) {
      m.sum = (static_cast<double>(m.count) * (m.shift * kScale) + m.dsum) * kUnscale;
    }
  }
  return m;
}

}  // namespace streamstate
