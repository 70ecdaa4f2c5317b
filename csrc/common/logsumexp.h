// The per-element math of the softmax losses (contrastive_loss and hard_negative_loss) on both
// devices: partial log-sum-exps merged online, and the coefficient of a logit in the gradient.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "host_device.h"

namespace mgccl {

MGCCL_HOST_DEVICE inline float math_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}
MGCCL_HOST_DEVICE inline double math_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}
MGCCL_HOST_DEVICE inline float math_log(float x) {
#if defined(__CUDA_ARCH__)
  return logf(x);
#else
  return std::log(x);
#endif
}
MGCCL_HOST_DEVICE inline double math_log(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

// A partial log-sum-exp: the largest value seen and the sum of exp(value - max) over the values
// seen; log-sum-exp = max + log(sum). Nothing seen: {-inf, 0}.
template <typename acc_t>
struct MaxSum {
  acc_t max;
  acc_t sum;

  MGCCL_HOST_DEVICE static MaxSum empty() {
    return {-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
  }

  // Adds one value (one exp, two when the max moves).
  MGCCL_HOST_DEVICE void add(acc_t x) {
    if (x > max) {
      sum = sum * math_exp(max - x) + acc_t(1);
      max = x;
    } else {
      sum += math_exp(x - max);
    }
  }

  MGCCL_HOST_DEVICE acc_t logsumexp() const { return max + math_log(sum); }
};

// Combines two partial log-sum-exps (commutative).
template <typename acc_t>
MGCCL_HOST_DEVICE inline MaxSum<acc_t> merge_max_sum(MaxSum<acc_t> a, MaxSum<acc_t> b) {
  const acc_t max = a.max > b.max ? a.max : b.max;
  if (max == -std::numeric_limits<acc_t>::infinity()) return a;
  return {max, a.sum * math_exp(a.max - max) + b.sum * math_exp(b.max - max)};
}

// dLoss/dlogit of one logit of a row whose loss weighs c (row loss = lse - positive logit):
// c * (softmax - [positive]).
template <typename acc_t>
MGCCL_HOST_DEVICE inline acc_t row_logit_gradient(acc_t logit, acc_t row_lse, acc_t c,
                                                  bool positive) {
  return c * (math_exp(logit - row_lse) - (positive ? acc_t(1) : acc_t(0)));
}

// The same for the symmetric loss, whose row entry is (row loss + column loss) / 2: the column
// softmax of logit (i, j) enters with the weight c_col of the row whose positive is column j.
template <typename acc_t>
MGCCL_HOST_DEVICE inline acc_t symmetric_logit_gradient(acc_t logit, acc_t row_lse, acc_t c,
                                                        acc_t col_lse, acc_t c_col, bool positive) {
  const acc_t softmaxes = c * math_exp(logit - row_lse) + c_col * math_exp(logit - col_lse);
  return softmaxes * acc_t(0.5) - (positive ? c : acc_t(0));
}

}  // namespace mgccl
