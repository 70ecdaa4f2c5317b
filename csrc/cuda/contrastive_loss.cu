// CUDA kernel of the fused similarity + contrastive loss (DESIGN.md op 1), the twin of
// csrc/cpu/contrastive_loss.cpp: same schemas, same semantics, same outputs.
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
// inputs, float64 for float64 inputs), so the kernels are instantiated for float and double;
// the input dtype enters only through the conversions around the matrix products.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <bit>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"

namespace mgccl {
namespace {

constexpr const char* kOp = "contrastive_loss";
constexpr const char* kBackwardOp = "contrastive_loss_backward";
// Bytes of one product tile. 32 MiB keeps cuBLAS busy (at N = M = 8192 a tile is 1024 rows)
// while the workspace stays an eighth of the N x M float32 logits there.
constexpr int64_t kTileBytes = int64_t{32} << 20;
// Threads of the row kernels (one block per row): a power of two from 32 to this.
constexpr int kMaxRowThreads = 512;
// The column kernel's block: kWarp consecutive columns times kColumnLanes row lanes.
constexpr int kWarp = 32;
constexpr int kColumnLanes = 16;

// ---------------------------------------------------------------------------------------------
// Device helpers

__device__ __forceinline__ float device_exp(float x) { return expf(x); }
__device__ __forceinline__ double device_exp(double x) { return exp(x); }
__device__ __forceinline__ float device_log(float x) { return logf(x); }
__device__ __forceinline__ double device_log(double x) { return log(x); }

// A partial log-sum-exp: the largest value seen and the sum of exp(value - max) over the
// values seen; log-sum-exp = max + log(sum). Nothing seen: {-inf, 0}.
template <typename acc_t>
struct MaxSum {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
__device__ __forceinline__ MaxSum<acc_t> empty_max_sum() {
  return {-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
}

// Adds one value to a partial log-sum-exp (one exp per value, two when the max moves).
template <typename acc_t>
__device__ __forceinline__ void add_value(MaxSum<acc_t>& state, acc_t x) {
  if (x > state.max) {
    state.sum = state.sum * device_exp(state.max - x) + acc_t(1);
    state.max = x;
  } else {
    state.sum += device_exp(x - state.max);
  }
}

// Combines two partial log-sum-exps.
struct MergeMaxSum {
  template <typename acc_t>
  __device__ __forceinline__ MaxSum<acc_t> operator()(MaxSum<acc_t> a, MaxSum<acc_t> b) const {
    const acc_t max = a.max > b.max ? a.max : b.max;
    if (max == -std::numeric_limits<acc_t>::infinity()) return a;
    return {max, a.sum * device_exp(a.max - max) + b.sum * device_exp(b.max - max)};
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
    acc_t g = c * device_exp(logit - row_lse);
    if constexpr (kSymmetric) {
      g = (g + c_cols[j] * device_exp(logit - col_lse[j])) * acc_t(0.5);
    }
    if (j == pos) g -= c;
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

  MaxSum<acc_t> state = empty_max_sum<acc_t>();
  for (int64_t j = threadIdx.x; j < m; j += blockDim.x) add_value(state, s * row[j]);
  state = block_allreduce(state, MergeMaxSum{});
  const acc_t lse = state.max + device_log(state.sum);
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
  MaxSum<acc_t> state = empty_max_sum<acc_t>();
  if (j < m) {
    for (int64_t i = threadIdx.y; i < rows; i += kColumnLanes) {
      add_value(state, s * products[i * m + j]);
    }
  }
  lanes[threadIdx.y][threadIdx.x] = state;
  __syncthreads();
  if (threadIdx.y == 0 && j < m) {
    MaxSum<acc_t> total{col_max[j], col_sum[j]};
    for (int lane = 0; lane < kColumnLanes; ++lane) {
      total = MergeMaxSum{}(total, lanes[lane][threadIdx.x]);
    }
    col_max[j] = total.max;
    col_sum[j] = total.sum;
  }
}

// ---------------------------------------------------------------------------------------------
// Host side

int64_t rows_per_tile(int64_t n, int64_t m, at::ScalarType acc) {
  const int64_t elements = kTileBytes / static_cast<int64_t>(c10::elementSize(acc));
  return std::max<int64_t>(1, std::min<int64_t>(n, elements / std::max<int64_t>(m, 1)));
}

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

// Checks on values, as the CPU kernel makes them: scale finite, pos in range and, when
// symmetric, a permutation. All read back in one device-to-host copy: [scale as float64 bits,
// min pos, max pos, largest count of one key among pos (symmetric)].
void check_values(const at::Tensor& k, const at::Tensor& pos, const at::Tensor& scale,
                  bool symmetric) {
  const int64_t m = k.size(0);
  std::vector<at::Tensor> parts{scale.to(at::kDouble).reshape({1}).view(at::kLong)};
  if (pos.numel() > 0) {
    const auto [low, high] = at::aminmax(pos);
    parts.push_back(low.reshape({1}));
    parts.push_back(high.reshape({1}));
    if (symmetric) {
      const at::Tensor counts =
          at::zeros({m}, pos.options()).scatter_add_(0, pos.clamp(0, m - 1), at::ones_like(pos));
      parts.push_back(counts.max().reshape({1}));
    }
  }
  const at::Tensor host = at::cat(parts).cpu();
  const int64_t* values = host.data_ptr<int64_t>();
  const double s = std::bit_cast<double>(values[0]);
  TORCH_CHECK(std::isfinite(s), kOp, ": scale should be finite, got ", s);
  if (pos.numel() == 0) return;
  const int64_t low = symmetric ? 0 : -1;
  TORCH_CHECK(values[1] >= low && values[2] < m, kOp, ": pos values should lie in [", low, ", ", m,
              "), got min ", values[1], " and max ", values[2]);
  TORCH_CHECK(!symmetric || values[3] == 1, kOp,
              ": symmetric=True needs pos to be a permutation of 0..M-1, got repeated values");
}

// The inputs as the sweeps use them, on q's device.
struct Prepared {
  at::Tensor q;      // [N, D] contiguous, input dtype
  at::Tensor k_acc;  // [M, D] contiguous, accumulation dtype
  at::Tensor pos;    // [N] contiguous
  at::Tensor scale;  // 0-dim, accumulation dtype
  at::ScalarType acc;
};

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                 const at::Tensor& scale) {
  const auto acc = accumulation_type(q.scalar_type());
  return {q.contiguous(), k.to(acc).contiguous(), pos.contiguous(), scale.to(acc), acc};
}

// Fills the first `rows` rows of the workspace with R = q[row0 : row0 + rows] k^T and returns
// them; *q_tile receives those query rows in the accumulation dtype.
at::Tensor tile_products(const Prepared& p, at::Tensor& workspace, int64_t row0, int64_t rows,
                         at::Tensor* q_tile) {
  *q_tile = p.q.narrow(0, row0, rows).to(p.acc);
  at::Tensor products = workspace.narrow(0, 0, rows);
  at::mm_out(products, *q_tile, p.k_acc.t());
  return products;
}

// Row statistics of one tile (row_logsumexp_kernel); the fused gradient when c_rows is defined.
void launch_row_logsumexp(at::Tensor& products, int64_t row0, const Prepared& p,
                          const at::Tensor& c_rows, at::Tensor& row_lse, at::Tensor& pos_logit,
                          const at::Tensor& scale_rows) {
  const int64_t rows = products.size(0), m = products.size(1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "contrastive_loss_row_logsumexp", [&] {
    const auto kernel = c_rows.defined() ? row_logsumexp_kernel<scalar_t, true>
                                         : row_logsumexp_kernel<scalar_t, false>;
    kernel<<<static_cast<unsigned>(rows), row_threads(m), 0, stream>>>(
        products.data_ptr<scalar_t>(), m, p.scale.data_ptr<scalar_t>(),
        p.pos.data_ptr<int64_t>() + row0, data_or_null<scalar_t>(c_rows, row0),
        row_lse.data_ptr<scalar_t>() + row0, pos_logit.data_ptr<scalar_t>() + row0,
        data_or_null<scalar_t>(scale_rows, row0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_column_logsumexp(const at::Tensor& products, const Prepared& p, at::Tensor& col_max,
                             at::Tensor& col_sum) {
  const int64_t rows = products.size(0), m = products.size(1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 block(kWarp, kColumnLanes);
  AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "contrastive_loss_column_logsumexp", [&] {
    column_logsumexp_kernel<scalar_t>
        <<<static_cast<unsigned>((m + kWarp - 1) / kWarp), block, 0, stream>>>(
            products.data_ptr<scalar_t>(), rows, m, p.scale.data_ptr<scalar_t>(),
            col_max.data_ptr<scalar_t>(), col_sum.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Gradient of one tile in place (logit_gradient_kernel); col_lse and c_cols when symmetric.
void launch_logit_gradient(at::Tensor& products, int64_t row0, const Prepared& p,
                           const at::Tensor& c_rows, const at::Tensor& row_lse,
                           const at::Tensor& col_lse, const at::Tensor& c_cols,
                           const at::Tensor& scale_rows, bool symmetric) {
  const int64_t rows = products.size(0), m = products.size(1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "contrastive_loss_logit_gradient", [&] {
    const auto kernel =
        symmetric ? logit_gradient_kernel<scalar_t, true> : logit_gradient_kernel<scalar_t, false>;
    kernel<<<static_cast<unsigned>(rows), row_threads(m), 0, stream>>>(
        products.data_ptr<scalar_t>(), m, p.scale.data_ptr<scalar_t>(),
        p.pos.data_ptr<int64_t>() + row0, c_rows.data_ptr<scalar_t>() + row0,
        row_lse.data_ptr<scalar_t>() + row0, data_or_null<scalar_t>(col_lse, 0),
        data_or_null<scalar_t>(c_cols, 0), data_or_null<scalar_t>(scale_rows, row0));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// Sums the gradients from tiles of scale * G = dLoss/dR: grad_q rows = (scale G) k, grad_k
// accumulates (scale G)^T q_tile in the accumulation dtype, and scale_rows [N] receives each
// row's sum_j G_ij R_ij from the kernels (summed into grad_scale at the end).
struct GradientSink {
  GradientSink(const Prepared& p, std::array<bool, 3> mask)
      : want_q(mask[0]), want_k(mask[1]), want_scale(mask[2]) {
    const auto acc_opts = p.q.options().dtype(p.acc);
    // Zeros: with M = 0 no tile runs and the gradients are 0.
    if (want_q) grad_q = at::zeros_like(p.q);
    if (want_k) grad_k = at::zeros(p.k_acc.sizes(), acc_opts);
    if (want_scale) scale_rows = at::zeros({p.q.size(0)}, acc_opts);
  }

  bool any() const { return want_q || want_k || want_scale; }

  // dR: [rows, M] = scale * G for query rows [row0, row0 + rows); q_tile: those rows.
  void add_tile(int64_t row0, const at::Tensor& q_tile, const at::Tensor& k_acc,
                const at::Tensor& dR) {
    if (want_q) {
      at::Tensor rows = grad_q.narrow(0, row0, dR.size(0));
      if (rows.scalar_type() == dR.scalar_type()) {
        at::mm_out(rows, dR, k_acc);
      } else {
        rows.copy_(at::mm(dR, k_acc));
      }
    }
    if (want_k) grad_k.addmm_(dR.t(), q_tile);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(const at::Tensor& q,
                                                        const at::Tensor& scale_t) const {
    // A fresh empty tensor for each gradient not asked for: outputs must not alias each other.
    return {want_q ? grad_q : q.new_empty({0}),
            want_k ? grad_k.to(q.scalar_type()) : q.new_empty({0}),
            want_scale ? scale_rows.sum().to(scale_t.scalar_type()) : scale_t.new_empty({0})};
  }

  bool want_q, want_k, want_scale;
  at::Tensor grad_q, grad_k, scale_rows;
};

// Second sweep: gradients given complete log-sum-exps. c_rows [N] = dLoss/dloss_row.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gradient_sweep(
    const Prepared& p, const at::Tensor& scale_t, const at::Tensor& c_rows,
    const at::Tensor& row_lse, const at::Tensor& col_lse, bool symmetric,
    std::array<bool, 3> mask) {
  const int64_t n = p.q.size(0), m = p.k_acc.size(0);
  GradientSink sink(p, mask);
  if (n == 0 || m == 0 || !sink.any()) return sink.finish(p.q, scale_t);
  // Column coefficient of the symmetric loss: c_cols[pos[i]] = c_rows[i].
  const at::Tensor c_cols =
      symmetric ? at::zeros({m}, c_rows.options()).index_copy_(0, p.pos, c_rows) : at::Tensor();
  const int64_t tile = rows_per_tile(n, m, p.acc);
  at::Tensor workspace = at::empty({tile, m}, p.q.options().dtype(p.acc));
  for (int64_t row0 = 0; row0 < n; row0 += tile) {
    const int64_t rows = std::min(tile, n - row0);
    at::Tensor q_tile;
    at::Tensor products = tile_products(p, workspace, row0, rows, &q_tile);
    launch_logit_gradient(products, row0, p, c_rows, row_lse, col_lse, c_cols, sink.scale_rows,
                          symmetric);
    sink.add_tile(row0, q_tile, p.k_acc, products);
  }
  return sink.finish(p.q, scale_t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_loss_cuda(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& pos_in,
                      const at::Tensor& scale_t, const std::optional<at::Tensor>& weight,
                      c10::string_view reduction, bool symmetric, std::array<bool, 3> grad_mask) {
  // The ATen calls below are the kernel's own arithmetic, never recorded by autograd.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_contrastive_metadata(q_in, k, pos_in, scale_t, symmetric);
  TORCH_CHECK(reduction == "mean" || reduction == "sum" || reduction == "none", kOp,
              ": reduction should be 'mean', 'sum' or 'none', got '", std::string(reduction), "'");
  check_weight(kOp, weight, q_in);
  // Dispatched here, some argument is on the GPU, and all were checked to be on q's device.
  TORCH_INTERNAL_ASSERT(q_in.is_cuda());
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  check_values(k, pos_in, scale_t, symmetric);
  const Prepared p = prepare(q_in, k, pos_in, scale_t);
  const int64_t n = p.q.size(0), m = p.k_acc.size(0);
  const auto acc_opts = p.q.options().dtype(p.acc);

  const at::Tensor valid = p.pos.ge(0).to(p.acc);
  const at::Tensor w = row_weights(weight, p.pos, p.acc);
  // c_rows = dLoss/dloss_row for "mean"/"sum": w / sum(w) (0 when that is 0), or w.
  at::Tensor c_rows = w;
  if (reduction == "mean") {
    const at::Tensor total = w.sum();
    c_rows = at::where(total.ne(0).logical_and(p.pos.ge(0)), w / total, at::zeros_like(w));
  }

  // Sweep 1: per-row log-sum-exp and positive logit; per-column online log-sum-exp.
  at::Tensor row_lse = at::zeros({n}, acc_opts);
  at::Tensor pos_logit = at::zeros({n}, acc_opts);
  at::Tensor col_max = at::full({symmetric ? m : 0}, -INFINITY, acc_opts);
  at::Tensor col_sum = at::zeros({symmetric ? m : 0}, acc_opts);
  const bool fuse_gradients =
      reduction != "none" && !symmetric && (grad_mask[0] || grad_mask[1] || grad_mask[2]);
  GradientSink sink(p, fuse_gradients ? grad_mask : std::array<bool, 3>{false, false, false});

  if (n > 0 && m > 0) {
    const int64_t tile = rows_per_tile(n, m, p.acc);
    at::Tensor workspace = at::empty({tile, m}, acc_opts);
    for (int64_t row0 = 0; row0 < n; row0 += tile) {
      const int64_t rows = std::min(tile, n - row0);
      at::Tensor q_tile;
      at::Tensor products = tile_products(p, workspace, row0, rows, &q_tile);
      launch_row_logsumexp(products, row0, p, fuse_gradients ? c_rows : at::Tensor(), row_lse,
                           pos_logit, sink.scale_rows);
      if (symmetric) launch_column_logsumexp(products, p, col_max, col_sum);
      if (fuse_gradients) sink.add_tile(row0, q_tile, p.k_acc, products);
    }
  }

  const at::Tensor col_lse = col_max + col_sum.log();
  at::Tensor row_loss = row_lse - pos_logit;
  if (symmetric) {
    row_loss = 0.5 * (row_lse + col_lse.index_select(0, p.pos)) - pos_logit;
  }
  row_loss = m > 0 ? row_loss * valid : at::zeros({n}, acc_opts);

  at::Tensor gq = p.q.new_empty({0}), gk = p.q.new_empty({0}), gs = scale_t.new_empty({0});
  at::Tensor loss;
  if (reduction == "none") {
    loss = weight.has_value() ? row_loss * w : row_loss;
  } else {
    loss = reduction == "sum" ? (row_loss * w).sum() : (row_loss * c_rows).sum();
    if (fuse_gradients) {
      std::tie(gq, gk, gs) = sink.finish(p.q, scale_t);
    } else if (grad_mask[0] || grad_mask[1] || grad_mask[2]) {
      std::tie(gq, gk, gs) =
          gradient_sweep(p, scale_t, c_rows, row_lse, col_lse, symmetric, grad_mask);
    }
  }
  return {loss, row_lse, col_lse, gq, gk, gs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_backward_cuda(
    const at::Tensor& row_grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
    const at::Tensor& scale_t, const at::Tensor& row_lse, const at::Tensor& col_lse, bool symmetric,
    std::array<bool, 3> grad_mask) {
  // Reached through an Autograd fallthrough (csrc/mgccl_ops.cpp): keep autograd out of the ATen
  // calls below.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_contrastive_metadata(q, k, pos, scale_t, symmetric);
  check_dim(kBackwardOp, "row_grad", row_grad, 1);
  check_size(kBackwardOp, "row_grad", row_grad, 0, q.size(0), "q.shape[0]");
  check_same_device(kBackwardOp, "row_grad", row_grad, q);
  check_dim(kBackwardOp, "row_lse", row_lse, 1);
  check_size(kBackwardOp, "row_lse", row_lse, 0, q.size(0), "q.shape[0]");
  check_same_device(kBackwardOp, "row_lse", row_lse, q);
  check_same_device(kBackwardOp, "col_lse", col_lse, q);
  if (symmetric) {
    check_dim(kBackwardOp, "col_lse", col_lse, 1);
    check_size(kBackwardOp, "col_lse", col_lse, 0, k.size(0), "k.shape[0]");
  }
  // Dispatched here, some argument is on the GPU, and all were checked to be on q's device.
  TORCH_INTERNAL_ASSERT(q.is_cuda());
  const c10::cuda::CUDAGuard device_guard(q.device());
  check_values(k, pos, scale_t, symmetric);
  const Prepared p = prepare(q, k, pos, scale_t);
  const at::Tensor c_rows =
      at::where(p.pos.ge(0), row_grad.to(p.acc), at::zeros({}, row_grad.options().dtype(p.acc)));
  return gradient_sweep(p, scale_t, c_rows, row_lse.to(p.acc).contiguous(),
                        symmetric ? col_lse.to(p.acc).contiguous() : at::Tensor(), symmetric,
                        grad_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(mgccl, CUDA, m) {
  m.impl("contrastive_loss", &contrastive_loss_cuda);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_cuda);
}

}  // namespace mgccl
