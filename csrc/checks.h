// Argument checks shared by the kernels (CPU and CUDA): each names the op, the argument (as the
// call spells it) and what it received. Only metadata checks and host-side value checks live
// here; none of them launches device work except check_index_range (a min/max reduction).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <cmath>
#include <optional>
#include <sstream>
#include <string>

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

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " should be a floating tensor, got ", t.scalar_type());
}

inline void check_index_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kLong, op, ": ", name, " should be int64, got ",
              t.scalar_type());
}

// `t` (argument `name`) lives on the device of `ref` (argument `ref_name`).
inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const char* ref_name, const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
}

// The same, for the ops whose reference argument is the queries `q`.
inline void check_same_device(const char* op, const char* name, const at::Tensor& t,
                              const at::Tensor& q) {
  check_same_device(op, name, t, "q", q);
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

// The product of `sizes` (an output's element count), refused when it overflows int64.
inline int64_t checked_numel(const char* op, const char* what,
                             std::initializer_list<int64_t> sizes) {
  int64_t total = 1;
  for (const int64_t s : sizes) {
    TORCH_CHECK(!c10::mul_overflows(total, s, &total), op, ": ", what,
                " has more elements than int64 can count");
  }
  return total;
}

// Runs f(), prefixing the op's name to any error it raises (an allocator's "not enough memory",
// say), so that every failure of a call names the op.
template <typename F>
auto naming_op(const char* op, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::Error& e) {
    TORCH_CHECK(false, op, ": ", e.what_without_backtrace());
  }
}

// The accumulation dtype: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType accumulation_type(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

// q [N, D] and k [M, D]: floating, one dtype, one device, one width.
inline void check_queries_and_keys(const char* op, const at::Tensor& q, const at::Tensor& k) {
  check_dim(op, "q", q, 2);
  check_dim(op, "k", k, 2);
  check_floating(op, "q", q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k has dtype ", k.scalar_type(),
              " but q has dtype ", q.scalar_type());
  check_size(op, "k", k, 1, q.size(1), "q.shape[1]");
  check_same_device(op, "k", k, q);
}

// A per-row int64 tensor [rows] (pos, q_group, ...) on q's device.
inline void check_row_index(const char* op, const char* name, const at::Tensor& t,
                            const at::Tensor& q, int64_t rows, const char* what) {
  check_dim(op, name, t, 1);
  check_index_dtype(op, name, t);
  check_size(op, name, t, 0, rows, what);
  check_same_device(op, name, t, q);
}

// scale: a 0-dim floating tensor on q's device (metadata only).
inline void check_scale_metadata(const char* op, const at::Tensor& scale, const at::Tensor& q) {
  check_same_device(op, "scale", scale, q);
  TORCH_CHECK(scale.dim() == 0, op, ": scale should be a 0-dim tensor, got shape ",
              shape_string(scale));
  check_floating(op, "scale", scale);
}

// The value of scale, which must be finite (reads it: a device sync on the GPU).
inline double finite_scale(const char* op, const at::Tensor& scale) {
  const double s = scale.item<double>();
  TORCH_CHECK(std::isfinite(s), op, ": scale should be finite, got ", s);
  return s;
}

// weight: an optional [N] floating tensor on q's device.
inline void check_weight(const char* op, const std::optional<at::Tensor>& weight,
                         const at::Tensor& q) {
  if (!weight.has_value()) return;
  check_dim(op, "weight", *weight, 1);
  check_size(op, "weight", *weight, 0, q.size(0), "q.shape[0]");
  check_floating(op, "weight", *weight);
  check_same_device(op, "weight", *weight, q);
}

inline void check_reduction(const char* op, c10::string_view reduction) {
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none", op,
              ": reduction should be 'mean', 'sum' or 'none', got '", std::string(reduction), "'");
}

// Shapes, dtypes and devices of contrastive_loss's inputs (the value checks live with each
// kernel).
inline void check_contrastive_metadata(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& pos, const at::Tensor& scale,
                                       bool symmetric) {
  constexpr const char* op = "contrastive_loss";
  check_queries_and_keys(op, q, k);
  check_row_index(op, "pos", pos, q, q.size(0), "q.shape[0]");
  check_scale_metadata(op, scale, q);
  if (symmetric) {
    TORCH_CHECK(q.size(0) == k.size(0), op, ": symmetric=True needs N == M, got N = ", q.size(0),
                " and M = ", k.size(0));
  }
}

// Per-row weights of the losses [N] in the accumulation dtype: weight[i] (1 without weights)
// on rows with pos[i] >= 0 and exactly 0 on ignored rows, whatever their weight (NaN included).
inline at::Tensor row_weights(const std::optional<at::Tensor>& weight, const at::Tensor& pos,
                              at::ScalarType acc) {
  const at::Tensor valid = pos.ge(0);
  if (!weight.has_value()) return valid.to(acc);
  return at::where(valid, weight->to(acc), at::zeros({}, pos.options().dtype(acc)));
}

// The coefficient of each row's loss in the reduced loss: w / W for "mean" (W = sum of w over
// rows with a positive, whatever its sign; NaN when a weight is NaN; all 0 only when W == 0
// exactly) and w for "sum"; always 0 on ignored rows (pos < 0). Sets *zero_mean when the mean is
// over a total weight of exactly 0.
inline at::Tensor row_coefficients(const at::Tensor& w, const at::Tensor& pos,
                                   c10::string_view reduction, bool* zero_mean) {
  *zero_mean = false;
  if (reduction != "mean") return w;
  const double total = w.sum().item<double>();
  if (total == 0.0) {
    *zero_mean = true;
    return at::zeros_like(w);
  }
  return at::where(pos.ge(0), w / total, at::zeros({}, w.options()));
}

}  // namespace mgccl
