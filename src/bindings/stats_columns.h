// Turning Moments into what Python sees, shared by the aggregate store and the spilling
// aggregator so both hand back exactly the same shapes.
#pragma once

#include "bindings/prelude.h"
#include "core/errors.h"
#include "core/stats.h"

#include <string>
#include <string_view>
#include <vector>

namespace streamstate::bindings {

inline NanPolicy parse_nan_policy(std::string_view name) {
  if (name == "skip") return NanPolicy::kSkip;
  if (name == "propagate") return NanPolicy::kPropagate;
  if (name == "raise") return NanPolicy::kRaise;
  throw InvalidArgument("nan_policy must be 'skip', 'propagate' or 'raise', got '" +
                        std::string(name) + "'");
}

// (count, sum, min, max, mean, var, std) — the fields of streamstate.Stats, in order.
inline py::tuple stats_tuple(const Moments& m) {
  return py::make_tuple(m.count, m.sum, m.min, m.max, m.mean(), m.var(), m.stddev());
}

// {"key": keys, "count": uint64[n], "sum"/"min"/"max"/"mean"/"var"/"std": float64[n]}.
// `keys` is whatever key column the caller built (an int64 array or a list of bytes); the
// numeric columns are filled with the GIL released.
inline py::dict stats_columns(py::object keys, const std::vector<Moments>& stats) {
  const auto n = static_cast<py::ssize_t>(stats.size());
  py::array_t<std::uint64_t> count(n);
  py::array_t<double> sum(n), min(n), max(n), mean(n), var(n), std_(n);
  {
    std::uint64_t* c = count.mutable_data();
    double* s = sum.mutable_data();
    double* lo = min.mutable_data();
    double* hi = max.mutable_data();
    double* mu = mean.mutable_data();
    double* v = var.mutable_data();
    double* sd = std_.mutable_data();
    // Only raw arrays owned by this call are written while released.
    const MaybeReleaseGil release(stats.size() * 64);
    for (std::size_t i = 0; i < stats.size(); ++i) {
      const Moments& m = stats[i];
      c[i] = m.count;
      s[i] = m.sum;
      lo[i] = m.min;
      hi[i] = m.max;
      mu[i] = m.mean();
      v[i] = m.var();
      sd[i] = m.stddev();
    }
  }
  py::dict out;
  out["key"] = std::move(keys);
  out["count"] = count;
  out["sum"] = sum;
  out["min"] = min;
  out["max"] = max;
  out["mean"] = mean;
  out["var"] = var;
  out["std"] = std_;
  return out;
}

}  // namespace streamstate::bindings
