// Exact k-th smallest of many values known to lie in a range, in two linear passes.
//
// A histogram over equal-width bins of [low, high] finds the bin holding the k-th value; only
// that bin's values are then selected among (std::nth_element); the binning and the walk to the
// target bin are common/order_statistic.h's, shared with the GPU. The bin of a value is a
// monotone function of it, so the answer is exact; for the neighbour similarities of an image
// (clustered, but spread over many bins) the last selection sees a few percent of the values.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/order_statistic.h"

namespace mgccl {

// The k-th smallest (0-based) of values, k < values.size(); values outside [low, high] count
// in the end bins, NaN in the first. values is left unchanged.
template <typename acc_t>
acc_t kth_smallest(const std::vector<acc_t>& values, size_t k, acc_t low, acc_t high) {
  const acc_t scale = order_scale(low, high);
  const auto bin = [&](acc_t v) { return order_bin(v, low, scale); };
  std::vector<int32_t> counts(kOrderBins, 0);
  for (const acc_t v : values) ++counts[bin(v)];
  int64_t before = 0;
  const int32_t target = target_bin(counts.data(), static_cast<int64_t>(k), &before);
  std::vector<acc_t> candidates;
  candidates.reserve(counts[target]);
  for (const acc_t v : values) {
    if (bin(v) == target) candidates.push_back(v);
  }
  const auto kth = candidates.begin() + (static_cast<int64_t>(k) - before);
  std::nth_element(candidates.begin(), kth, candidates.end());
  return *kth;
}

}  // namespace mgccl
