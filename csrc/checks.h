// Argument checks shared by the kernels: each names the op, the argument and what it received.
#pragma once

#include <ATen/ATen.h>

#include <sstream>

namespace mgccl {

inline std::string shape_string(const at::Tensor& t) {
  std::ostringstream out;
  out << t.sizes();
  return out.str();
}

// Checks that `t` has `dim` dimensions, e.g. "q should be a 2-D tensor, got 3-D with shape [2, 3,
// 4]".
inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " should be a ", dim, "-D tensor, got ", t.dim(),
              "-D with shape ", shape_string(t));
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t axis,
                       int64_t expected, const char* what) {
  TORCH_CHECK(t.size(axis) == expected, op, ": ", name, ".shape[", axis, "] should equal ", what,
              " = ", expected, ", got shape ", shape_string(t));
}

inline void check_index_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " should be int64, got ",
              t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but q is on ",
              ref.device());
}

// Values of an int64 index tensor must lie in [low, high).
inline void check_index_range(const char* op, const char* name, const at::Tensor& t, int64_t low,
                              int64_t high) {
  if (t.numel() == 0) return;
  const int64_t lo = t.min().item<int64_t>();
  const int64_t hi = t.max().item<int64_t>();
  TORCH_CHECK(lo >= low && hi < high, op, ": ", name, " values should lie in [", low, ", ", high,
              "), got min ", lo, " and max ", hi);
}

// The accumulation dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType accumulation_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace mgccl
