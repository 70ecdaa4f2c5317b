// The order statistic behind region_merge's "auto" threshold: the exact k-th smallest of many
// values known to lie in a range, by a histogram over equal-width bins (which bin holds the
// k-th value) and a selection among that bin's values only. The bin of a value is a monotone
// function of it, so the answer is exact on any device. The CPU (csrc/cpu/order_statistic.h)
// and the GPU (csrc/cuda/region_merge.cu, per-image histograms) share the binning, the walk to
// the target bin and the threshold rule below.
#pragma once

#include <cstdint>

#include "auto_threshold_rule.h"
#include "host_device.h"

namespace mgccl {

constexpr int32_t kOrderBins = 1 << 14;

// The bin of value v in [low, high] (scale = kOrderBins / (high - low)); values outside count
// in the end bins, NaN in the first.
template <typename acc_t>
MGCCL_HOST_DEVICE inline int32_t order_bin(acc_t v, acc_t low, acc_t scale) {
  const acc_t x = exact_mul(exact_add(v, -low), scale);
  if (x >= acc_t(kOrderBins - 1)) return kOrderBins - 1;
  return x > 0 ? static_cast<int32_t>(x) : 0;
}

template <typename acc_t>
MGCCL_HOST_DEVICE inline acc_t order_scale(acc_t low, acc_t high) {
  return exact_div(acc_t(kOrderBins), high - low);
}

// The bin holding the k-th smallest value given the bin counts; *before receives the number of
// values in the bins below it (so the answer is the (k - *before)-th smallest of that bin).
template <typename count_t>
MGCCL_HOST_DEVICE inline int32_t target_bin(const count_t* counts, int64_t k, int64_t* before) {
  int32_t target = 0;
  int64_t below = 0;
  while (below + static_cast<int64_t>(counts[target]) <= k) below += counts[target++];
  *before = below;
  return target;
}

// The automatic threshold rule of auto_threshold_rule.h, median(s) - kAutoMadFactor *
// kMadToSigma * MAD(s), in float64 with each step rounded as on the host.
MGCCL_HOST_DEVICE inline double auto_threshold_rule(double median, double mad) {
  return exact_add(median, -exact_mul(exact_mul(kAutoMadFactor, kMadToSigma), mad));
}

}  // namespace mgccl
