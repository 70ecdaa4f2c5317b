// Shape, dtype and device checks of the contrastive_loss operators, shared by the CPU and CUDA
// kernels (no device work: the value checks live with each kernel).
#pragma once

#include <ATen/ATen.h>

#include "checks.h"

namespace mgccl {

inline void check_contrastive_metadata(const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& pos, const at::Tensor& scale,
                                       bool symmetric) {
  constexpr const char* op = "contrastive_loss";
  check_dim(op, "q", q, 2);
  check_dim(op, "k", k, 2);
  check_dim(op, "pos", pos, 1);
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), op, ": q should be a floating tensor, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), op, ": k has dtype ", k.scalar_type(),
              " but q has dtype ", q.scalar_type());
  check_size(op, "k", k, 1, q.size(1), "q.shape[1]");
  check_size(op, "pos", pos, 0, q.size(0), "q.shape[0]");
  check_index_dtype(op, "pos", pos);
  check_same_device(op, "k", k, q);
  check_same_device(op, "pos", pos, q);
  check_same_device(op, "scale", scale, q);
  TORCH_CHECK(scale.dim() == 0, op, ": scale should be a 0-dim tensor, got shape ",
              shape_string(scale));
  TORCH_CHECK(at::isFloatingType(scale.scalar_type()), op,
              ": scale should be a floating tensor, got ", scale.scalar_type());
  if (symmetric) {
    TORCH_CHECK(q.size(0) == k.size(0), op, ": symmetric=True needs N == M, got N = ", q.size(0),
                " and M = ", k.size(0));
  }
}

}  // namespace mgccl
