// The rule of region_merge's automatic threshold, defined once for the C++ kernels and, through
// the compiled module's attributes, for the Python reference and docs:
//   threshold = median(s) - kAutoMadFactor * kMadToSigma * MAD(s)
// over an image's neighbour similarities s (lower medians). kMadToSigma turns the median absolute
// deviation into a robust standard deviation (its ratio for normal data). How the factor was
// chosen: mgccl_ops/ops/region_merge.py, bench/tune_auto_threshold.py.
#pragma once

namespace mgccl {

inline constexpr double kAutoMadFactor = 1.0;
inline constexpr double kMadToSigma = 1.4826;

}  // namespace mgccl
