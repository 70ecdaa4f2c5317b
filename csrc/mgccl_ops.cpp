// Operator schemas of the mgccl namespace and the pybind11 module that carries them.
//
// Kernels live in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(mgccl, CPU, m)) and csrc/cuda/*.cu
// (TORCH_LIBRARY_IMPL(mgccl, CUDA, m)); the typed Python wrappers, fake impls and autograd
// registrations are in mgccl_ops/ops/.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "auto_threshold_rule.h"

TORCH_LIBRARY(mgccl, m) {
  // Fused similarity + contrastive loss (DESIGN.md op 1). `loss` is a 0-dim tensor for
  // reduction "mean"/"sum" and [N] for "none"; row_lse [N] and col_lse [M] (symmetric, else
  // [0]) are the log-sum-exps kept for the backward pass. For "mean"/"sum" the gradients of
  // `loss` with respect to q, k and scale are computed in the same pass over the key bank when
  // grad_mask asks for them (else empty), so backward only rescales them.
  m.def(
      "contrastive_loss(Tensor q, Tensor k, Tensor pos, Tensor scale, Tensor? weight, "
      "str reduction, bool symmetric, bool[3] grad_mask) -> "
      "(Tensor loss, Tensor row_lse, Tensor col_lse, Tensor grad_q, Tensor grad_k, "
      "Tensor grad_scale)");
  // Gradients of sum_i row_grad[i] * loss_row[i] given the saved log-sum-exps (reduction "none").
  m.def(
      "contrastive_loss_backward(Tensor row_grad, Tensor q, Tensor k, Tensor pos, Tensor scale, "
      "Tensor row_lse, Tensor col_lse, bool symmetric, bool[3] grad_mask) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_scale)");
  // Hard-negative mining (DESIGN.md op 2): per row the allowed keys of largest <q_i, k_j>
  // (docs/ops.md lists what excludes a key), the first `skip` dropped, the next `num` returned:
  // idx [N, num] int64 and sim [N, num] float32, padded with -1 / -inf. No gradient.
  m.def(
      "topk_hard_negatives(Tensor q, Tensor k, int num, Tensor? pos, Tensor? q_group, "
      "Tensor? k_group, bool exclude_self, float? max_sim, float? margin, int skip) -> "
      "(Tensor idx, Tensor sim)");
  // Hard-negative contrastive loss (DESIGN.md op 3). row_loss [N] holds the unweighted row losses
  // (0 for ignored rows). For "mean"/"sum" the gradients are computed in the same pass when
  // grad_mask asks for them (else empty), as for contrastive_loss.
  m.def(
      "hard_negative_loss(Tensor q, Tensor k, Tensor pos, Tensor neg_idx, Tensor scale, "
      "Tensor? weight, str reduction, bool[3] grad_mask) -> "
      "(Tensor loss, Tensor row_loss, Tensor grad_q, Tensor grad_k, Tensor grad_scale)");
  // Gradients of sum_i row_grad[i] * loss_row[i] (reduction "none"); recomputes the logits.
  m.def(
      "hard_negative_loss_backward(Tensor row_grad, Tensor q, Tensor k, Tensor pos, "
      "Tensor neg_idx, Tensor scale, bool[3] grad_mask) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_scale)");
  // Pairwise-sigmoid (SigLIP) loss: z_ij = scale * <q_i, k_j> + bias, label +1 where i == j and
  // -1 elsewhere, loss = -sum_ij log sigmoid(label_ij z_ij) / N (0-dim, float32 or float64).
  // The gradients of `loss` with respect to q, k, scale and bias are computed in the same pass
  // when grad_mask asks for them (else empty), so backward only rescales them.
  m.def(
      "sigmoid_contrastive_loss(Tensor q, Tensor k, Tensor scale, Tensor bias, bool[4] grad_mask) "
      "-> (Tensor loss, Tensor grad_q, Tensor grad_k, Tensor grad_scale, Tensor grad_bias)");
  // Region merging (DESIGN.md op 5). feat [B, C, H, W]; threshold [B] floating, or None for
  // each image's automatic threshold (region_auto_threshold); connectivity 4 or 8; linkage
  // "single" or "average". labels [B, H, W] int64, compact per image (0..num[b]-1 in raster order
  // of each region's first pixel); num [B] int64.
  m.def(
      "region_merge(Tensor feat, Tensor? threshold, int connectivity, str linkage) -> "
      "(Tensor labels, Tensor num)");
  // The automatic per-image threshold [B] float64 that region_merge uses when none is given.
  m.def("region_auto_threshold(Tensor feat, int connectivity) -> Tensor");
  // Mean of x [B, C, H, W] over each region: pooled [B, R, C] (R = num.max(), data-dependent)
  // and the pixel count of each region, counts [B, R] int64.
  m.def("region_pool(Tensor x, Tensor labels, Tensor num) -> (Tensor pooled, Tensor counts)");
  // Each pixel takes its region's row: pooled [B, R, C], labels [B, H, W] -> [B, C, H, W].
  m.def("region_broadcast(Tensor pooled, Tensor labels) -> Tensor");
  // Sum of x [B, C, H, W] over each region -> [B, num_regions, C]: the adjoint of region_broadcast.
  m.def("region_sum(Tensor x, Tensor labels, SymInt num_regions) -> Tensor");
}

// The backward operators (contrastive_loss_backward, hard_negative_loss_backward) get an autograd
// formula in mgccl_ops/ops/ that refuses double backward with a clear error.

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = MGCCL_TORCH_VERSION;
#ifdef MGCCL_WITH_CUDA
  info["with_cuda"] = true;
  info["cuda_version"] = MGCCL_CUDA_VERSION;
#else
  info["with_cuda"] = false;
  info["cuda_version"] = pybind11::none();
#endif
  info["cuda_archs"] = MGCCL_CUDA_ARCHS;
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["num_threads"] = at::get_num_threads();
  info["parallel_info"] = at::get_parallel_info();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "mgccl_ops compiled kernels; the operators register under torch.ops.mgccl";
  m.def("build_info", &build_info,
        "Versions and options this module was built with (torch, CUDA, archs, OpenMP threads)");
  m.attr("AUTO_MAD_FACTOR") = mgccl::kAutoMadFactor;
  m.attr("MAD_TO_SIGMA") = mgccl::kMadToSigma;
}
