// CUDA kernel of the fused similarity + contrastive loss (DESIGN.md op 1): the CUDA side of
// contrastive_driver.h, whose host code (checks, sweeps, loss and gradient bookkeeping) the CPU
// kernel shares; the per-element math (partial log-sum-exps, logit-gradient coefficients) is
// csrc/common/logsumexp.h's, which the CPU tests run.
//
// The products R = q k^T are formed one row tile at a time ([rows, M], at most kTileBytes) by
// cuBLAS into one reused workspace; the kernels below read the logits S = scale * R from it
// (scale is read on the device, so the loop never waits for the host), reduce them to per-row
// and, when symmetric, per-column log-sum-exps, and turn the tile into the gradient in place.
// The N x M matrix never exists. For reduction "mean"/"sum" the gradient is taken from the
// same tile as the row statistics (non-symmetric: one sweep, three matrix products in all) or
// in a second sweep once the column log-sum-exps are complete (symmetric, and the backward of
// reduction "none").
//
// The tile is held in the accumulation dtype (float32 for float16, bfloat16 and float32
// inputs, float64 for float64 inputs), so the kernels are instantiated for float and double.
// float16 / bfloat16 inputs are multiplied in their own dtype on the tensor cores with float32
// accumulation and output (cublasGemmEx on ATen's handle and stream): the logits tile R, and in
// the gradient products the tile dR = scale * G rounded to the input dtype (as flash-attention
// style kernels round P), accumulated into float32 grad_k.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <bit>
#include <cmath>
#include <limits>
#include <vector>

#include "common/logsumexp.h"
#include "contrastive_driver.h"

namespace mgccl {
namespace {

// Threads of the row kernels (one block per row): a power of two from 32 to this.
constexpr int kMaxRowThreads = 512;
// The column kernel's block: kWarp consecutive columns times kColumnLanes row lanes.
constexpr int kWarp = 32;
constexpr int kColumnLanes = 16;

// ---------------------------------------------------------------------------------------------
// Device helpers

// Combines two partial log-sum-exps (common/logsumexp.h) in block reductions.
struct MergeMaxSum {
  template <typename acc_t>
  __device__ __forceinline__ MaxSum<acc_t> operator()(MaxSum<acc_t> a, MaxSum<acc_t> b) const {
    return merge_max_sum(a, b);
  }
};

struct Add {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

template <typename T>
__device__ __forceinline__ T shuffle_xor(T value, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, value, lane_mask);
}

template <typename acc_t>
__device__ __forceinline__ MaxSum<acc_t> shuffle_xor(MaxSum<acc_t> value, int lane_mask) {
  return {shuffle_xor(value.max, lane_mask), shuffle_xor(value.sum, lane_mask)};
}

// Reduces `value` over the block with `combine` (commutative); every thread receives the same
// result. blockDim.x is a multiple of 32 and at most 1024; blockDim.y
// is 1. Every thread of the block must call it.
template <typename T, typename Combine>
__device__ T block_allreduce(T value, Combine combine) {
  __shared__ T warp_results[32];
  for (int lane_mask = kWarp / 2; lane_mask > 0; lane_mask /= 2) {
    value = combine(value, shuffle_xor(value, lane_mask));
  }
  if (threadIdx.x % kWarp == 0) warp_results[threadIdx.x / kWarp] = value;
  __syncthreads();
  value = warp_results[0];
  for (int w = 1; w < static_cast<int>(blockDim.x) / kWarp; ++w) {
    value = combine(value, warp_results[w]);
  }
  __syncthreads();  // warp_results may be reused by the next reduction
  return value;
}

// Overwrites one row of products R_i. [m] with scale * G_i., where G = dLoss/dS:
//   G_ij = c_i softmax_j(S_i.) - c_i [j == pos_i]                                (one-sided)
//   G_ij = (c_i softmax_j(S_i.) + c'_j softmax_i(S_.j)) / 2 - c_i [j == pos_i]   (symmetric)
// with softmax_j(S_i.) = exp(S_ij - row_lse_i) and softmax_i(S_.j) = exp(S_ij - col_lse_j).
// scale * G is dLoss/dR, ready for the products grad_q = (scale G) k and grad_k = (scale G)^T q.
// Returns this thread's part of sum_j G_ij R_ij, the row's share of dLoss/dscale.
template <typename acc_t, bool kSymmetric>
__device__ acc_t write_row_gradient(acc_t* row, int64_t m, acc_t scale, acc_t row_lse, acc_t c,
                                    int64_t pos, const acc_t* col_lse, const acc_t* c_cols) {
  acc_t scale_part = 0;
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) {
    const acc_t product = row[j];
    const acc_t logit = scale * product;
    acc_t g;
    if constexpr (kSymmetric) {
      g = symmetric_logit_gradient(logit, row_lse, c, col_lse[j], c_cols[j], j == pos);
    } else {
      g = row_logit_gradient(logit, row_lse, c, j == pos);
    }
    scale_part += g * product;
    row[j] = scale * g;
  }
  return scale_part;
}

// Per-row statistics of one tile; one block per row i < rows.
//   products [rows, m]: R = q_tile k^T; the logits are S = *scale * R.
//   Writes row_lse[i] = logsumexp_j S_ij and pos_logit[i] = S_i,max(pos_i, 0) (the value is
//   unused for ignored rows, pos_i = -1).
//   kGradient: also overwrites R_i. with scale * G_i. (write_row_gradient, one-sided) for the row
//   coefficients c_rows [rows], and writes scale_rows[i] = sum_j G_ij R_ij unless scale_rows is
//   null.
// pos, c_rows, row_lse, pos_logit and scale_rows point at the tile's first row.
template <typename acc_t, bool kGradient>
__global__ void row_logsumexp_kernel(acc_t* products, int64_t m, const acc_t* scale,
                                     const int64_t* pos, const acc_t* c_rows, acc_t* row_lse,
                                     acc_t* pos_logit, acc_t* scale_rows) {
  const int64_t i = blockIdx.x;
  acc_t* row = products + i * m;
  const acc_t s = *scale;
  const int64_t p = pos[i];
  // Read before the reduction's barrier: afterwards kGradient overwrites the row.
  const acc_t positive = threadIdx.x == 0 ? s * row[p < 0 ? 0 : p] : acc_t(0);

  MaxSum<acc_t> state = MaxSum<acc_t>::empty();
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) state.add(s * row[j]);
  state = block_allreduce(state, MergeMaxSum{});
  const acc_t lse = state.logsumexp();
  if (threadIdx.x == 0) {
    row_lse[i] = lse;
    pos_logit[i] = positive;
  }
  if constexpr (kGradient) {
    const acc_t part =
        write_row_gradient<acc_t, false>(row, m, s, lse, c_rows[i], p, nullptr, nullptr);
    if (scale_rows != nullptr) {
      const acc_t total = block_allreduce(part, Add{});
      if (threadIdx.x == 0) scale_rows[i] = total;
    }
  }
}

// Gradient of one tile given complete log-sum-exps; one block per row i < rows.
//   products [rows, m]: R = q_tile k^T, overwritten with scale * G (write_row_gradient).
//   row_lse, c_rows [rows]; col_lse, c_cols [m] (kSymmetric only).
//   Writes scale_rows[i] = sum_j G_ij R_ij unless scale_rows is null.
// pos, c_rows, row_lse and scale_rows point at the tile's first row.
template <typename acc_t, bool kSymmetric>
__global__ void logit_gradient_kernel(acc_t* products, int64_t m, const acc_t* scale,
                                      const int64_t* pos, const acc_t* c_rows, const acc_t* row_lse,
                                      const acc_t* col_lse, const acc_t* c_cols,
                                      acc_t* scale_rows) {
  const int64_t i = blockIdx.x;
  const acc_t part = write_row_gradient<acc_t, kSymmetric>(products + i * m, m, *scale, row_lse[i],
                                                           c_rows[i], pos[i], col_lse, c_cols);
  if (scale_rows != nullptr) {
    const acc_t total = block_allreduce(part, Add{});
    if (threadIdx.x == 0) scale_rows[i] = total;
  }
}

// Online per-column log-sum-exp: folds the tile's logits S = *scale * R (products [rows, m])
// into the running col_max [m] and col_sum [m] (sum over all rows seen so far of
// exp(S_ij - col_max_j)). Block (kWarp, kColumnLanes): kWarp consecutive columns, whose
// threadIdx.y lanes stride over the rows; lane 0 folds the lanes into the running state.
template <typename acc_t>
__global__ void column_logsumexp_kernel(const acc_t* products, int64_t rows, int64_t m,
                                        const acc_t* scale, acc_t* col_max, acc_t* col_sum) {
  __shared__ MaxSum<acc_t> lanes[kColumnLanes][kWarp];
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kWarp + threadIdx.x;
  const acc_t s = *scale;
  MaxSum<acc_t> state = MaxSum<acc_t>::empty();
  if (j < m) {
    for (int64_t i = threadIdx.y; i < rows; i += kColumnLanes) state.add(s * products[i * m + j]);
  }
  lanes[threadIdx.y][threadIdx.x] = state;
  __syncthreads();
  if (threadIdx.y == 0 && j < m) {
    MaxSum<acc_t> total{col_max[j], col_sum[j]};
    for (int lane = 0; lane < kColumnLanes; ++lane) {
      total = merge_max_sum(total, lanes[lane][threadIdx.x]);
    }
    col_max[j] = total.max;
    col_sum[j] = total.sum;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side: the CUDA device of contrastive_driver.h

// Threads per row block: the power of two covering m, from 32 to kMaxRowThreads.
int row_threads(int64_t m) {
  int threads = kWarp;
  while (threads < m && threads < kMaxRowThreads) threads *= 2;
  return threads;
}

template <typename T>
T* data_or_null(const at::Tensor& t, int64_t offset) {
  return t.defined() ? t.data_ptr<T>() + offset : nullptr;
}

bool half_precision(at::ScalarType dtype) { return dtype == at::kHalf || dtype == at::kBFloat16; }

cudaDataType_t cuda_type(at::ScalarType dtype) {
  return dtype == at::kHalf ? CUDA_R_16F : CUDA_R_16BF;
}

// out (float32, column-major m x n, leading dimension ldc) = alpha op(A) op(B) + beta out, with
// A and B float16 / bfloat16 (column-major views) multiplied on the tensor cores and accumulated
// in float32: cuBLAS GemmEx on the current stream's handle.
void gemm_half_to_float(at::ScalarType dtype, cublasOperation_t op_a, cublasOperation_t op_b,
                        int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, const void* b,
                        int64_t ldb, float beta, float* out, int64_t ldc) {
  TORCH_CHECK(m <= INT32_MAX && n <= INT32_MAX && k <= INT32_MAX, "contrastive_loss",
              ": matrix sizes beyond 2^31 - 1 are not supported, got ", m, " x ", n, " x ", k);
  const float alpha = 1.0f;
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  TORCH_CUDABLAS_CHECK(cublasGemmEx(
      handle, op_a, op_b, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), &alpha, a,
      cuda_type(dtype), static_cast<int>(lda), b, cuda_type(dtype), static_cast<int>(ldb), &beta,
      out, CUDA_R_32F, static_cast<int>(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

struct CudaContrastive {
  // 32 MiB keeps cuBLAS busy (at N = M = 8192 a tile is 1024 rows) while the workspace stays an
  // eighth of the N x M float32 logits there.
  static constexpr int64_t kTileBytes = int64_t{32} << 20;

  // float16 / bfloat16 keys stay in their dtype (the products run on the tensor cores with
  // float32 accumulation and output); float32 / float64 keys are multiplied as they are.
  static ContrastiveInputs prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                   const at::Tensor& scale) {
    // Dispatched here, some argument is on the GPU, and all were checked to be on q's device.
    TORCH_INTERNAL_ASSERT(q.is_cuda());
    const auto acc = accumulation_type(q.scalar_type());
    return {q.contiguous(), k.contiguous(), pos.contiguous(), scale.to(acc).contiguous(), acc};
  }

  // R [rows, M] = q[row0 : row0 + rows] k^T, row-major: column-major R^T = k q_rows^T.
  static at::Tensor products(const ContrastiveInputs& in, at::Tensor& workspace, int64_t row0,
                             int64_t rows) {
    const c10::cuda::CUDAGuard device_guard(in.q.device());
    at::Tensor out = workspace.narrow(0, 0, rows);
    const int64_t m = in.k.size(0), d = in.k.size(1);
    if (!half_precision(in.q.scalar_type())) {
      at::mm_out(out, in.q.narrow(0, row0, rows), in.k.t());
      return out;
    }
    gemm_half_to_float(in.q.scalar_type(), CUBLAS_OP_T, CUBLAS_OP_N, m, rows, d,
                       in.k.const_data_ptr(), d,
                       static_cast<const char*>(in.q.const_data_ptr()) +
                           row0 * d * static_cast<int64_t>(in.q.element_size()),
                       d, 0.0f, out.data_ptr<float>(), m);
    return out;
  }

  static void row_stats(at::Tensor& products, int64_t row0, const ContrastiveInputs& in,
                        const at::Tensor& c_rows, at::Tensor& row_lse, at::Tensor& pos_logit,
                        const at::Tensor& scale_rows) {
    const int64_t rows = products.size(0), m = products.size(1);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "contrastive_loss_row_logsumexp", [&] {
      const auto kernel = c_rows.defined() ? row_logsumexp_kernel<scalar_t, true>
                                           : row_logsumexp_kernel<scalar_t, false>;
      kernel<<<static_cast<unsigned>(rows), row_threads(m), 0, stream>>>(
          products.data_ptr<scalar_t>(), m, in.scale.data_ptr<scalar_t>(),
          in.pos.data_ptr<int64_t>() + row0, data_or_null<scalar_t>(c_rows, row0),
          row_lse.data_ptr<scalar_t>() + row0, pos_logit.data_ptr<scalar_t>() + row0,
          data_or_null<scalar_t>(scale_rows, row0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void column_stats(const at::Tensor& products, const ContrastiveInputs& in,
                           at::Tensor& col_max, at::Tensor& col_sum) {
    const int64_t rows = products.size(0), m = products.size(1);
    const auto stream = at::cuda::getCurrentCUDAStream();
    const dim3 block(kWarp, kColumnLanes);
    AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "contrastive_loss_column_logsumexp", [&] {
      column_logsumexp_kernel<scalar_t>
          <<<static_cast<unsigned>((m + kWarp - 1) / kWarp), block, 0, stream>>>(
              products.data_ptr<scalar_t>(), rows, m, in.scale.data_ptr<scalar_t>(),
              col_max.data_ptr<scalar_t>(), col_sum.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void logit_gradient(at::Tensor& products, int64_t row0, const ContrastiveInputs& in,
                             const at::Tensor& c_rows, const at::Tensor& row_lse,
                             const at::Tensor& col_lse, const at::Tensor& c_cols,
                             const at::Tensor& scale_rows, bool symmetric) {
    const int64_t rows = products.size(0), m = products.size(1);
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "contrastive_loss_logit_gradient", [&] {
      const auto kernel = symmetric ? logit_gradient_kernel<scalar_t, true>
                                    : logit_gradient_kernel<scalar_t, false>;
      kernel<<<static_cast<unsigned>(rows), row_threads(m), 0, stream>>>(
          products.data_ptr<scalar_t>(), m, in.scale.data_ptr<scalar_t>(),
          in.pos.data_ptr<int64_t>() + row0, c_rows.data_ptr<scalar_t>() + row0,
          row_lse.data_ptr<scalar_t>() + row0, data_or_null<scalar_t>(col_lse, 0),
          data_or_null<scalar_t>(c_cols, 0), data_or_null<scalar_t>(scale_rows, row0));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // grad_q rows = dR k and grad_k += dR^T q_rows. float16 / bfloat16: dR is rounded to the input
  // dtype and both products run on the tensor cores with float32 accumulation and output.
  static void add_gradients(const ContrastiveInputs& in, int64_t row0, const at::Tensor& dR,
                            at::Tensor& grad_q, at::Tensor& grad_k) {
    const int64_t rows = dR.size(0), m = in.k.size(0), d = in.k.size(1);
    const at::Tensor q_rows = in.q.narrow(0, row0, rows);
    if (!half_precision(in.q.scalar_type())) {
      if (grad_q.defined()) {
        at::Tensor out = grad_q.narrow(0, row0, rows);
        at::mm_out(out, dR, in.k);
      }
      if (grad_k.defined()) grad_k.addmm_(dR.t(), q_rows);
      return;
    }
    const at::ScalarType dtype = in.q.scalar_type();
    const at::Tensor dR_half = dR.to(dtype);
    if (grad_q.defined()) {
      // Column-major [D, rows] = k^T (column-major view of k) times dR^T (of dR).
      at::Tensor rows_out = at::empty({rows, d}, dR.options());
      gemm_half_to_float(dtype, CUBLAS_OP_N, CUBLAS_OP_N, d, rows, m, in.k.const_data_ptr(), d,
                         dR_half.const_data_ptr(), m, 0.0f, rows_out.data_ptr<float>(), d);
      grad_q.narrow(0, row0, rows).copy_(rows_out);
    }
    if (grad_k.defined()) {
      // Column-major [D, M] += q_rows^T (column-major view of q_rows) times dR.
      gemm_half_to_float(dtype, CUBLAS_OP_N, CUBLAS_OP_T, d, m, rows, q_rows.const_data_ptr(), d,
                         dR_half.const_data_ptr(), m, 1.0f, grad_k.data_ptr<float>(), d);
    }
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_loss_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                      const at::Tensor& scale, const std::optional<at::Tensor>& weight,
                      c10::string_view reduction, bool symmetric, std::array<bool, 3> grad_mask) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  return contrastive_loss_driver<CudaContrastive>(q, k, pos, scale, weight, reduction, symmetric,
                                                  grad_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_backward_cuda(
    const at::Tensor& row_grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
    const at::Tensor& scale, const at::Tensor& row_lse, const at::Tensor& col_lse, bool symmetric,
    std::array<bool, 3> grad_mask) {
  const c10::cuda::CUDAGuard device_guard(q.device());
  return contrastive_loss_backward_driver<CudaContrastive>(row_grad, q, k, pos, scale, row_lse,
                                                           col_lse, symmetric, grad_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(mgccl, CUDA, m) {
  m.impl("contrastive_loss", &contrastive_loss_cuda);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_cuda);
}

}  // namespace mgccl
