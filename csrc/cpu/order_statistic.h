// Exact k-th smallest of many values known to lie in a range, in two linear passes.
//
// A histogram over equal-width bins of [low, high] finds the bin holding the k-th value; only
// that bin's values are then selected among (std::nth_element). The bin of a value is a
// monotone function of it, so the answer is exact; for the neighbour similarities of an image
// (clustered, but spread over many bins) the last selection sees a few percent of the values.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

namespace mgccl {

// The k-th smallest (0-based) of values, k < values.size(); values outside [low, high] count
// in the end bins, NaN in the first. values is left unchanged.
template <typename acc_t>
acc_t kth_smallest(const std::vector<acc_t>& values, size_t k, acc_t low, acc_t high) {
  constexpr int32_t kBins = 1 << 14;
  const acc_t scale = acc_t(kBins) / (high - low);
  const auto bin = [&](acc_t v) -> int32_t {
    const acc_t x = (v - low) * scale;
    if (x >= acc_t(kBins - 1)) return kBins - 1;
    return x > 0 ? static_cast<int32_t>(x) : 0;
  };
  std::vector<int32_t> counts(kBins, 0);
  for (const acc_t v : values) ++counts[bin(v)];
  int32_t target = 0;
  size_t before = 0;
  while (before + counts[target] <= k) before += counts[target++];
  std::vector<acc_t> candidates;
  candidates.reserve(counts[target]);
  for (const acc_t v : values) {
    if (bin(v) == target) candidates.push_back(v);
  }
  const auto kth = candidates.begin() + (k - before);
  std::nth_element(candidates.begin(), kth, candidates.end());
  return *kth;
}

}  // namespace mgccl
