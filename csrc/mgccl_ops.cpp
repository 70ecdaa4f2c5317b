// Operator schemas of the mgccl namespace and the pybind11 module that carries them.
//
// Kernels live in csrc/cpu/*.cpp (TORCH_LIBRARY_IMPL(mgccl, CPU, m)) and csrc/cuda/*.cu
// (TORCH_LIBRARY_IMPL(mgccl, CUDA, m)); the typed Python wrappers, fake impls and autograd
// registrations are in mgccl_ops/ops/.
#include <ATen/Parallel.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

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
}

// Backward operators are not differentiable themselves (no double backward): autograd passes
// through them without recording a graph.
TORCH_LIBRARY_IMPL(mgccl, Autograd, m) {
  m.impl("contrastive_loss_backward", torch::CppFunction::makeFallthrough());
}

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
}
