// The host driver of the fused similarity + contrastive loss (DESIGN.md op 1), shared by the CPU
// and CUDA kernels: argument and value checks, the sweeps over row tiles, the loss and the
// gradient bookkeeping, over a small per-device interface `Device`
// (csrc/cpu/contrastive_loss.cpp, csrc/cuda/contrastive_loss.cu):
//
//   Device::kTileBytes                       bytes of one [rows, M] product tile
//   Device::prepare(q, k, pos, scale)     -> ContrastiveInputs on q's device
//   Device::products(in, workspace, row0, rows) -> R = q[row0 : row0 + rows] k^T, [rows, M] in
//       the accumulation dtype, written into the workspace's first rows
//   Device::row_stats(R, row0, in, c_rows, row_lse, pos_logit, scale_rows)
//       row_lse[i] = logsumexp_j scale R_ij and pos_logit[i] = scale R_i,max(pos_i, 0) for the
//       tile's rows; when c_rows is defined, also R <- scale G (one-sided G = dLoss/dS) and
//       scale_rows[i] = sum_j G_ij R_ij (when defined)
//   Device::column_stats(R, in, col_max, col_sum)  folds the tile into running column lse's
//   Device::logit_gradient(R, row0, in, c_rows, row_lse, col_lse, c_cols, scale_rows, symmetric)
//       R <- scale G given complete log-sum-exps; scale_rows as above
//   Device::add_gradients(in, row0, dR, grad_q, grad_k)
//       grad_q rows = dR k, grad_k += dR^T q_rows (grad_q / grad_k undefined: not wanted)
//
// The per-element math of row_stats / column_stats / logit_gradient (partial log-sum-exps and
// the logit-gradient coefficient) is csrc/common/logsumexp.h on both devices.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <bit>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"

namespace mgccl {

// The inputs as the sweeps use them, on q's device.
struct ContrastiveInputs {
  at::Tensor q;      // [N, D] contiguous, input dtype
  at::Tensor k;      // [M, D] contiguous, in the dtype the device multiplies (see prepare)
  at::Tensor pos;    // [N] contiguous
  at::Tensor scale;  // 0-dim, accumulation dtype
  at::ScalarType acc;
};

// Checks on values: scale finite, pos in range and, when symmetric, a permutation. All read back
// in one device-to-host copy: [scale as float64 bits, min pos, max pos, largest count of one key
// among pos (symmetric)].
inline void check_contrastive_values(const at::Tensor& k, const at::Tensor& pos,
                                     const at::Tensor& scale, bool symmetric) {
  constexpr const char* op = "contrastive_loss";
  const int64_t m = k.size(0);
  std::vector<at::Tensor> parts{scale.to(at::kDouble).reshape({1}).view(at::kLong)};
  if (pos.numel() > 0) {
    const auto [low, high] = at::aminmax(pos);
    parts.push_back(low.reshape({1}));
    parts.push_back(high.reshape({1}));
    if (symmetric) {
      const at::Tensor counts =
          at::zeros({m}, pos.options())
              .scatter_add_(0, pos.clamp(0, std::max<int64_t>(m - 1, 0)), at::ones_like(pos));
      parts.push_back(counts.max().reshape({1}));
    }
  }
  const at::Tensor host = at::cat(parts).cpu();
  const int64_t* values = host.data_ptr<int64_t>();
  const double s = std::bit_cast<double>(values[0]);
  TORCH_CHECK(std::isfinite(s), op, ": scale should be finite, got ", s);
  if (pos.numel() == 0) return;
  const int64_t low = symmetric ? 0 : -1;
  TORCH_CHECK(values[1] >= low && values[2] < m, op, ": pos values should lie in [", low, ", ", m,
              "), got min ", values[1], " and max ", values[2]);
  TORCH_CHECK(!symmetric || values[3] == 1, op,
              ": symmetric=True needs pos to be a permutation of 0..M-1, got repeated values");
}

template <typename Device>
int64_t contrastive_rows_per_tile(int64_t n, int64_t m, at::ScalarType acc) {
  const int64_t elements = Device::kTileBytes / static_cast<int64_t>(c10::elementSize(acc));
  return std::max<int64_t>(1, std::min<int64_t>(n, elements / std::max<int64_t>(m, 1)));
}

// Sums the gradients from tiles of dR = scale * G = dLoss/dR: grad_q rows = dR k, grad_k
// accumulates dR^T q_tile in the accumulation dtype, and scale_rows [N] receives each row's
// sum_j G_ij R_ij (summed into grad_scale at the end).
struct ContrastiveGradients {
  ContrastiveGradients(const ContrastiveInputs& in, std::array<bool, 3> mask)
      : want_q(mask[0]), want_k(mask[1]), want_scale(mask[2]) {
    const auto acc_opts = in.q.options().dtype(in.acc);
    // Zeros: with M = 0 no tile runs and the gradients are 0.
    if (want_q) grad_q = at::zeros_like(in.q);
    if (want_k) grad_k = at::zeros(in.k.sizes(), acc_opts);
    if (want_scale) scale_rows = at::zeros({in.q.size(0)}, acc_opts);
  }

  bool any() const { return want_q || want_k || want_scale; }

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
template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_gradient_sweep(
    const ContrastiveInputs& in, const at::Tensor& scale_t, const at::Tensor& c_rows,
    const at::Tensor& row_lse, const at::Tensor& col_lse, bool symmetric,
    std::array<bool, 3> mask) {
  const int64_t n = in.q.size(0), m = in.k.size(0);
  ContrastiveGradients sink(in, mask);
  if (n == 0 || m == 0 || !sink.any()) return sink.finish(in.q, scale_t);
  // Column coefficient of the symmetric loss: c_cols[pos[i]] = c_rows[i].
  const at::Tensor c_cols =
      symmetric ? at::zeros({m}, c_rows.options()).index_copy_(0, in.pos, c_rows) : at::Tensor();
  const int64_t tile = contrastive_rows_per_tile<Device>(n, m, in.acc);
  at::Tensor workspace = at::empty({tile, m}, in.q.options().dtype(in.acc));
  for (int64_t row0 = 0; row0 < n; row0 += tile) {
    const int64_t rows = std::min(tile, n - row0);
    at::Tensor products = Device::products(in, workspace, row0, rows);
    Device::logit_gradient(products, row0, in, c_rows, row_lse, col_lse, c_cols, sink.scale_rows,
                           symmetric);
    Device::add_gradients(in, row0, products, sink.grad_q, sink.grad_k);
  }
  return sink.finish(in.q, scale_t);
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_loss_driver(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& pos_in,
                        const at::Tensor& scale_t, const std::optional<at::Tensor>& weight,
                        c10::string_view reduction, bool symmetric, std::array<bool, 3> grad_mask) {
  constexpr const char* op = "contrastive_loss";
  // The ATen calls below are the kernel's own arithmetic, never recorded by autograd.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_contrastive_metadata(q_in, k, pos_in, scale_t, symmetric);
  check_contrastive_values(k, pos_in, scale_t, symmetric);
  check_reduction(op, reduction);
  check_weight(op, weight, q_in);
  const ContrastiveInputs in = Device::prepare(q_in, k, pos_in, scale_t);
  const int64_t n = in.q.size(0), m = in.k.size(0);
  const auto acc_opts = in.q.options().dtype(in.acc);

  const at::Tensor valid = in.pos.ge(0).to(in.acc);
  const at::Tensor w = row_weights(weight, in.pos, in.acc);
  // c_rows = dLoss/dloss_row: w / W for "mean" (all 0 when W == 0 exactly), w for "sum".
  bool zero_mean = false;
  const at::Tensor c_rows = row_coefficients(w, in.pos, reduction, &zero_mean);

  // Sweep 1: per-row log-sum-exp and positive logit; per-column online log-sum-exp.
  at::Tensor row_lse = at::zeros({n}, acc_opts);
  at::Tensor pos_logit = at::zeros({n}, acc_opts);
  at::Tensor col_max = at::full({symmetric ? m : 0}, -INFINITY, acc_opts);
  at::Tensor col_sum = at::zeros({symmetric ? m : 0}, acc_opts);
  const bool fuse_gradients =
      reduction != "none" && !symmetric && (grad_mask[0] || grad_mask[1] || grad_mask[2]);
  ContrastiveGradients sink(in,
                            fuse_gradients ? grad_mask : std::array<bool, 3>{false, false, false});

  if (n > 0 && m > 0) {
    const int64_t tile = contrastive_rows_per_tile<Device>(n, m, in.acc);
    at::Tensor workspace = at::empty({tile, m}, acc_opts);
    for (int64_t row0 = 0; row0 < n; row0 += tile) {
      const int64_t rows = std::min(tile, n - row0);
      at::Tensor products = Device::products(in, workspace, row0, rows);
      Device::row_stats(products, row0, in, fuse_gradients ? c_rows : at::Tensor(), row_lse,
                        pos_logit, sink.scale_rows);
      if (symmetric) Device::column_stats(products, in, col_max, col_sum);
      if (fuse_gradients) Device::add_gradients(in, row0, products, sink.grad_q, sink.grad_k);
    }
  }

  const at::Tensor col_lse = col_max + col_sum.log();
  at::Tensor row_loss = row_lse - pos_logit;
  if (symmetric) {
    row_loss = 0.5 * (row_lse + col_lse.index_select(0, in.pos)) - pos_logit;
  }
  row_loss = m > 0 ? row_loss * valid : at::zeros({n}, acc_opts);

  at::Tensor gq = in.q.new_empty({0}), gk = in.q.new_empty({0}), gs = scale_t.new_empty({0});
  at::Tensor loss;
  if (reduction == "none") {
    loss = weight.has_value() ? row_loss * w : row_loss;
  } else {
    // A mean over a total weight of exactly 0 is 0, even where a row loss is not finite.
    loss = zero_mean ? at::zeros({}, acc_opts) : (row_loss * c_rows).sum();
    if (fuse_gradients) {
      std::tie(gq, gk, gs) = sink.finish(in.q, scale_t);
    } else if (grad_mask[0] || grad_mask[1] || grad_mask[2]) {
      std::tie(gq, gk, gs) = contrastive_gradient_sweep<Device>(in, scale_t, c_rows, row_lse,
                                                                col_lse, symmetric, grad_mask);
    }
  }
  return {loss, row_lse, col_lse, gq, gk, gs};
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_backward_driver(
    const at::Tensor& row_grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
    const at::Tensor& scale_t, const at::Tensor& row_lse, const at::Tensor& col_lse, bool symmetric,
    std::array<bool, 3> grad_mask) {
  constexpr const char* op = "contrastive_loss_backward";
  // Reached through an Autograd fallthrough (csrc/mgccl_ops.cpp): keep autograd out of the ATen
  // calls below.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_contrastive_metadata(q, k, pos, scale_t, symmetric);
  check_dim(op, "row_grad", row_grad, 1);
  check_size(op, "row_grad", row_grad, 0, q.size(0), "q.shape[0]");
  check_same_device(op, "row_grad", row_grad, q);
  check_dim(op, "row_lse", row_lse, 1);
  check_size(op, "row_lse", row_lse, 0, q.size(0), "q.shape[0]");
  check_same_device(op, "row_lse", row_lse, q);
  check_same_device(op, "col_lse", col_lse, q);
  if (symmetric) {
    check_dim(op, "col_lse", col_lse, 1);
    check_size(op, "col_lse", col_lse, 0, k.size(0), "k.shape[0]");
  }
  check_contrastive_values(k, pos, scale_t, symmetric);
  const ContrastiveInputs in = Device::prepare(q, k, pos, scale_t);
  // Ignored rows take no gradient, whatever row_grad holds there (a NaN weight included).
  const at::Tensor c_rows =
      at::where(in.pos.ge(0), row_grad.to(in.acc), at::zeros({}, in.q.options().dtype(in.acc)));
  return contrastive_gradient_sweep<Device>(
      in, scale_t, c_rows, row_lse.to(in.acc).contiguous(),
      symmetric ? col_lse.to(in.acc).contiguous() : at::Tensor(), symmetric, grad_mask);
}

}  // namespace mgccl
