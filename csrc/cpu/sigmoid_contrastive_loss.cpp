// CPU kernel of the fused pairwise-sigmoid (SigLIP) contrastive loss.
//
//   z_ij = scale * <q_i, k_j> + bias,  y_ij = +1 if i == j else -1,
//   loss = -sum_ij log sigmoid(y_ij z_ij) / N,   dloss/dz_ij = (sigmoid(z_ij) - [i == j]) / N.
//
// The logits are produced one [kTileRows, kKeyBlock] tile at a time (a single-threaded
// at::mm_out into a thread's buffer, 512 KiB in float32) and reduced at once; the N x M matrix
// never exists. Row tiles go to threads through at::parallel_for. The row sweep yields the loss,
// grad_q, grad_scale and grad_bias; when grad_k is asked for, a column sweep over key tiles
// recomputes the tiles transposed and yields grad_k, so no thread accumulates a [M, D] buffer.
// Per-tile partial sums are added in tile order, so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"

namespace mgccl {
namespace {

constexpr const char* kOp = "sigmoid_contrastive_loss";
constexpr int64_t kTileRows = 256;
constexpr int64_t kKeyBlock = 512;

// log sigmoid(x), stable for every finite x: min(x, 0) - log1p(exp(-|x|)).
template <typename acc_t>
acc_t log_sigmoid(acc_t x) {
  return std::min(x, acc_t(0)) - std::log1p(std::exp(-std::abs(x)));
}

// Per-thread scratch for one [rows, cols] tile of logits and its derived terms.
struct TileBuffers {
  TileBuffers(int64_t elements, const at::TensorOptions& options)
      : z(at::empty({elements}, options)),
        grad(at::empty({elements}, options)),
        term(at::empty({elements}, options)) {}

  at::Tensor z, grad, term;
};

// For one tile of a (rows of `a`) x (rows of `b`) block, where the positive pairs are those with
// a_row0 + r == b_row0 + c: z = scale * a b^T + bias and grad = sigmoid(z) - [positive], both
// [rows, cols] views of the buffers. When `loss` is given, adds the tile's sum of
// -log sigmoid(y z) to it.
template <typename acc_t>
at::Tensor logit_gradient_tile(const at::Tensor& a, int64_t a_row0, const at::Tensor& b,
                               int64_t b_row0, acc_t scale, acc_t bias, TileBuffers& buf,
                               acc_t* loss) {
  const int64_t rows = a.size(0), cols = b.size(0);
  at::Tensor z = buf.z.narrow(0, 0, rows * cols).view({rows, cols});
  at::Tensor grad = buf.grad.narrow(0, 0, rows * cols).view({rows, cols});
  at::mm_out(z, a, b.t());
  z.mul_(scale).add_(bias);
  at::sigmoid_out(grad, z);
  if (loss != nullptr) {
    // Every pair as a negative: -log sigmoid(-z) = softplus(z); the positives are corrected
    // below. Above the threshold softplus(z) is z, within e^-threshold (below the dtype's eps).
    at::Tensor term = buf.term.narrow(0, 0, rows * cols).view({rows, cols});
    const double threshold = std::is_same_v<acc_t, double> ? 40.0 : 20.0;
    at::softplus_out(term, z, 1.0, threshold);
    *loss += term.sum().template item<acc_t>();
  }
  // The positives of this tile: r - c == b_row0 - a_row0.
  const int64_t shift = b_row0 - a_row0;
  const int64_t r0 = std::max<int64_t>(0, shift), r1 = std::min<int64_t>(rows, cols + shift);
  acc_t* z_data = z.data_ptr<acc_t>();
  acc_t* grad_data = grad.data_ptr<acc_t>();
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t pair = r * cols + (r - shift);
    grad_data[pair] -= acc_t(1);
    if (loss != nullptr) *loss += log_sigmoid(-z_data[pair]) - log_sigmoid(z_data[pair]);
  }
  return grad;
}

// Sums of one row tile: the loss terms, sum_ij g_ij (for grad_bias) and sum_i <q_i, (G k)_i>
// (for grad_scale), each over the tile's rows and all keys.
template <typename acc_t>
struct RowTileSums {
  acc_t loss = 0, grad_sum = 0, scaled_dot = 0;
};

template <typename acc_t>
std::vector<RowTileSums<acc_t>> row_sweep(const at::Tensor& q_acc, const at::Tensor& k_acc,
                                          acc_t scale, acc_t bias, bool want_q, bool want_scale,
                                          at::Tensor& grad_q_acc) {
  const int64_t n = q_acc.size(0), m = k_acc.size(0);
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
  std::vector<RowTileSums<acc_t>> sums(tiles);
  const bool want_gk = want_q || want_scale;
  at::parallel_for(0, tiles, 1, [&](int64_t tile0, int64_t tile1) {
    TileBuffers buf(kTileRows * std::min(kKeyBlock, m), k_acc.options());
    at::Tensor gk = at::empty({kTileRows, q_acc.size(1)}, k_acc.options());
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t row0 = tile * kTileRows, rows = std::min(kTileRows, n - row0);
      const at::Tensor q_tile = q_acc.narrow(0, row0, rows);
      at::Tensor gk_tile = gk.narrow(0, 0, rows).zero_();
      RowTileSums<acc_t>& s = sums[tile];
      for (int64_t j0 = 0; j0 < m; j0 += kKeyBlock) {
        const at::Tensor k_block = k_acc.narrow(0, j0, std::min(kKeyBlock, m - j0));
        const at::Tensor grad =
            logit_gradient_tile<acc_t>(q_tile, row0, k_block, j0, scale, bias, buf, &s.loss);
        s.grad_sum += grad.sum().template item<acc_t>();
        if (want_gk) gk_tile.addmm_(grad, k_block);
      }
      if (want_scale) s.scaled_dot = (gk_tile * q_tile).sum().template item<acc_t>();
      if (want_q) grad_q_acc.narrow(0, row0, rows).copy_(gk_tile);
    }
  });
  return sums;
}

// grad_k_acc [M, D] <- sum_i (sigmoid(z_ij) - [i == j]) q_i, one key tile at a time.
template <typename acc_t>
void column_sweep(const at::Tensor& q_acc, const at::Tensor& k_acc, acc_t scale, acc_t bias,
                  at::Tensor& grad_k_acc) {
  const int64_t n = q_acc.size(0), m = k_acc.size(0);
  const int64_t tiles = (m + kTileRows - 1) / kTileRows;
  at::parallel_for(0, tiles, 1, [&](int64_t tile0, int64_t tile1) {
    TileBuffers buf(kTileRows * std::min(kKeyBlock, n), k_acc.options());
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t col0 = tile * kTileRows, cols = std::min(kTileRows, m - col0);
      const at::Tensor k_tile = k_acc.narrow(0, col0, cols);
      at::Tensor grad_k_tile = grad_k_acc.narrow(0, col0, cols);
      for (int64_t i0 = 0; i0 < n; i0 += kKeyBlock) {
        const at::Tensor q_block = q_acc.narrow(0, i0, std::min(kKeyBlock, n - i0));
        // The transposed tile: rows are keys, columns are queries; positives still where the
        // key index equals the query index.
        const at::Tensor grad_t =
            logit_gradient_tile<acc_t>(k_tile, col0, q_block, i0, scale, bias, buf, nullptr);
        grad_k_tile.addmm_(grad_t, q_block);
      }
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale,
                  const at::Tensor& bias) {
  check_queries_and_keys(kOp, q, k);
  for (const auto& [name, t] : {std::pair{"scale", &scale}, std::pair{"bias", &bias}}) {
    TORCH_CHECK(t->dim() == 0, kOp, ": ", name, " should be a 0-dim tensor, got shape ",
                shape_string(*t));
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), kOp, ": ", name,
                " should be a floating tensor, got ", t->scalar_type());
    check_same_device(kOp, name, *t, q);
    const double value = t->item<double>();
    TORCH_CHECK(std::isfinite(value), kOp, ": ", name, " should be finite, got ", value);
  }
}

template <typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> compute(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale_t, const at::Tensor& bias_t,
    std::array<bool, 4> grad_mask) {
  const auto acc = accumulation_type(q.scalar_type());
  const int64_t n = q.size(0), m = k.size(0);
  const acc_t scale = static_cast<acc_t>(scale_t.item<double>());
  const acc_t bias = static_cast<acc_t>(bias_t.item<double>());
  const auto [want_q, want_k, want_scale, want_bias] = grad_mask;
  // Detached: worker threads of at::parallel_for do not inherit the below-autograd guard.
  const at::Tensor q_acc = q.detach().to(acc).contiguous();
  const at::Tensor k_acc = k.detach().to(acc).contiguous();
  // The mean over rows is 0 (with zero gradients) when there are no rows.
  const acc_t inv_n = n > 0 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(0);

  at::Tensor grad_q_acc = want_q ? at::zeros(q.sizes(), q_acc.options()) : at::Tensor();
  acc_t loss = 0, grad_sum = 0, scaled_dot = 0;
  if (n > 0 && m > 0) {
    for (const auto& s :
         row_sweep<acc_t>(q_acc, k_acc, scale, bias, want_q, want_scale, grad_q_acc)) {
      loss += s.loss;
      grad_sum += s.grad_sum;
      scaled_dot += s.scaled_dot;
    }
  }
  at::Tensor grad_k_acc;
  if (want_k) {
    grad_k_acc = at::zeros(k.sizes(), k_acc.options());
    if (n > 0 && m > 0) column_sweep<acc_t>(q_acc, k_acc, scale, bias, grad_k_acc);
  }
  const auto acc_opts = q.options().dtype(acc);
  // Fresh empty tensors for gradients not asked for: outputs must not alias each other.
  return {
      at::scalar_tensor(loss * inv_n, acc_opts),
      want_q ? grad_q_acc.mul_(scale * inv_n).to(q.scalar_type()) : q.new_empty({0}),
      want_k ? grad_k_acc.mul_(scale * inv_n).to(q.scalar_type()) : q.new_empty({0}),
      want_scale ? at::scalar_tensor(scaled_dot * inv_n, scale_t.options())
                 : scale_t.new_empty({0}),
      want_bias ? at::scalar_tensor(grad_sum * inv_n, bias_t.options()) : bias_t.new_empty({0})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> sigmoid_contrastive_loss_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& scale, const at::Tensor& bias,
    std::array<bool, 4> grad_mask) {
  // The ATen calls below are the kernel's own arithmetic, never recorded by autograd.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_inputs(q, k, scale, bias);
  if (accumulation_type(q.scalar_type()) == at::kDouble) {
    return compute<double>(q, k, scale, bias, grad_mask);
  }
  return compute<float>(q, k, scale, bias, grad_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(mgccl, CPU, m) {
  m.impl("sigmoid_contrastive_loss", &sigmoid_contrastive_loss_cpu);
}

}  // namespace mgccl
