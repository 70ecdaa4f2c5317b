// CPU kernel of the fused similarity + contrastive loss (DESIGN.md op 1).
//
// The logits S = scale * q k^T are produced one row tile at a time ([rows, M], at most
// kTileBytes), reduced to per-row (and, when symmetric, per-column) log-sum-exps and
// dropped: the N x M matrix never exists. For reduction "mean"/"sum" the gradient pass runs on
// the same tile (non-symmetric: one sweep, three matrix products in all) or in a second sweep
// once the column log-sum-exps are complete (symmetric).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <cmath>

#include "checks.h"

namespace mgccl {
namespace {

constexpr const char* kOp = "contrastive_loss";
// Bytes of one logits tile; larger tiles keep the matrix products near torch.mm's speed.
constexpr int64_t kTileBytes = int64_t{64} << 20;

int64_t rows_per_tile(int64_t n, int64_t m, at::ScalarType acc) {
  const int64_t elements = kTileBytes / static_cast<int64_t>(c10::elementSize(acc));
  return std::max<int64_t>(1, std::min<int64_t>(n, elements / std::max<int64_t>(m, 1)));
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                  const at::Tensor& scale, bool symmetric) {
  check_contrastive_metadata(q, k, pos, scale, symmetric);
  finite_scale(kOp, scale);
  if (symmetric) {
    check_index_range(kOp, "pos", pos, 0, k.size(0));
    TORCH_CHECK(pos.numel() == 0 || std::get<0>(at::_unique(pos)).numel() == pos.numel(), kOp,
                ": symmetric=True needs pos to be a permutation of 0..M-1, got repeated values");
  } else {
    check_index_range(kOp, "pos", pos, -1, k.size(0));
  }
}

// Sums per-tile gradient contributions: grad_q rows, grad_k (accumulated in the accumulation
// dtype) and grad_scale. `G` is dLoss/dS for one row tile, [rows, M].
struct GradientSink {
  GradientSink(const at::Tensor& q, const at::Tensor& k, at::ScalarType acc, double scale,
               std::array<bool, 3> mask)
      : scale(scale), want_q(mask[0]), want_k(mask[1]), want_scale(mask[2]) {
    if (want_q) grad_q = at::zeros_like(q, at::MemoryFormat::Contiguous);  // rows stay 0 if M == 0
    if (want_k) grad_k = at::zeros(k.sizes(), k.options().dtype(acc));
  }

  void add_tile(int64_t row0, const at::Tensor& q_tile, const at::Tensor& k_acc,
                const at::Tensor& G) {
    if (want_q || want_scale) {
      const at::Tensor gk = at::mm(G, k_acc);  // [rows, D] = sum_j G_ij k_j
      if (want_scale) grad_scale += (gk * q_tile).sum().item<double>();
      if (want_q) grad_q.narrow(0, row0, G.size(0)).copy_(gk.mul_(scale));
    }
    if (want_k) grad_k.addmm_(G.t(), q_tile, 1.0, scale);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> finish(const at::Tensor& q,
                                                        const at::Tensor& scale_t) {
    // A fresh empty tensor for each gradient not asked for: outputs must not alias each other.
    return {want_q ? grad_q : q.new_empty({0}),
            want_k ? grad_k.to(q.scalar_type()) : q.new_empty({0}),
            want_scale ? at::full({}, grad_scale, scale_t.options()) : scale_t.new_empty({0})};
  }

  double scale;
  bool want_q, want_k, want_scale;
  at::Tensor grad_q, grad_k;
  double grad_scale = 0.0;
};

// dLoss/dS for one row tile, computed in place of S. c_rows [rows]: the loss weight of each
// row; the positive logit takes -c_i. Symmetric adds the column softmax weighted by c_cols [M].
void logit_gradient(at::Tensor& S, const at::Tensor& row_lse, const at::Tensor& c_rows,
                    const at::Tensor& pos_rows, const at::Tensor& col_lse, const at::Tensor& c_cols,
                    bool symmetric) {
  if (symmetric) {
    const at::Tensor column_part = (S - col_lse.unsqueeze(0)).exp_().mul_(c_cols.unsqueeze(0));
    S.sub_(row_lse.unsqueeze(1)).exp_().mul_(c_rows.unsqueeze(1)).add_(column_part).mul_(0.5);
  } else {
    S.sub_(row_lse.unsqueeze(1)).exp_().mul_(c_rows.unsqueeze(1));
  }
  S.scatter_add_(1, pos_rows.clamp_min(0).unsqueeze(1), -c_rows.unsqueeze(1));
}

struct Prepared {
  at::Tensor k_acc;  // [M, D] keys in the accumulation dtype
  at::Tensor pos;    // [N]
  at::ScalarType acc;
  double scale;
};

Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                 const at::Tensor& scale) {
  const auto acc = accumulation_type(q.scalar_type());
  return {k.to(acc).contiguous(), pos.contiguous(), acc, scale.item<double>()};
}

at::Tensor scaled_logits(const at::Tensor& q, int64_t row0, int64_t rows, const Prepared& p,
                         at::Tensor* q_tile) {
  *q_tile = q.narrow(0, row0, rows).to(p.acc);
  return at::mm(*q_tile * p.scale, p.k_acc.t());
}

// Column coefficient of the symmetric loss: c_cols[pos[i]] = c_rows[i].
at::Tensor column_coefficients(const at::Tensor& c_rows, const at::Tensor& pos, int64_t m) {
  return at::zeros({m}, c_rows.options()).index_copy_(0, pos, c_rows);
}

// Second sweep: gradients given complete log-sum-exps. c_rows [N] = dLoss/dloss_row.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gradient_sweep(
    const at::Tensor& q, const at::Tensor& k, const Prepared& p, const at::Tensor& scale_t,
    const at::Tensor& c_rows, const at::Tensor& row_lse, const at::Tensor& col_lse, bool symmetric,
    std::array<bool, 3> mask) {
  const int64_t n = q.size(0), m = k.size(0);
  GradientSink sink(q, k, p.acc, p.scale, mask);
  const at::Tensor c_cols = symmetric ? column_coefficients(c_rows, p.pos, m) : at::Tensor();
  const int64_t tile = rows_per_tile(n, m, p.acc);
  for (int64_t row0 = 0; row0 < n && m > 0; row0 += tile) {
    const int64_t rows = std::min(tile, n - row0);
    at::Tensor q_tile;
    at::Tensor S = scaled_logits(q, row0, rows, p, &q_tile);
    logit_gradient(S, row_lse.narrow(0, row0, rows), c_rows.narrow(0, row0, rows),
                   p.pos.narrow(0, row0, rows), col_lse, c_cols, symmetric);
    sink.add_tile(row0, q_tile, p.k_acc, S);
  }
  return sink.finish(q, scale_t);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_loss_cpu(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& pos_in,
                     const at::Tensor& scale_t, const std::optional<at::Tensor>& weight,
                     c10::string_view reduction, bool symmetric, std::array<bool, 3> grad_mask) {
  // The ATen calls below are the kernel's own arithmetic, never recorded by autograd.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_inputs(q_in, k, pos_in, scale_t, symmetric);
  check_reduction(kOp, reduction);
  check_weight(kOp, weight, q_in);
  const at::Tensor q = q_in.contiguous();
  const int64_t n = q.size(0), m = k.size(0);
  const Prepared p = prepare(q, k, pos_in, scale_t);
  const auto acc_opts = q.options().dtype(p.acc);

  const at::Tensor valid = p.pos.ge(0).to(p.acc);
  const at::Tensor w = row_weights(weight, p.pos, p.acc);

  // Sweep 1: per-row log-sum-exp and positive logit; per-column online log-sum-exp.
  at::Tensor row_lse = at::zeros({n}, acc_opts);
  at::Tensor pos_logit = at::zeros({n}, acc_opts);
  at::Tensor col_max = at::full({symmetric ? m : 0}, -INFINITY, acc_opts);
  at::Tensor col_sum = at::zeros({symmetric ? m : 0}, acc_opts);
  const bool fuse_gradients =
      reduction != "none" && !symmetric && (grad_mask[0] || grad_mask[1] || grad_mask[2]);
  bool zero_mean = false;
  const at::Tensor c_rows = row_coefficients(w, p.pos, reduction, &zero_mean);
  GradientSink sink(q, k, p.acc, p.scale,
                    fuse_gradients ? grad_mask : std::array<bool, 3>{false, false, false});

  const int64_t tile = rows_per_tile(n, m, p.acc);
  for (int64_t row0 = 0; row0 < n && m > 0; row0 += tile) {
    const int64_t rows = std::min(tile, n - row0);
    at::Tensor q_tile;
    at::Tensor S = scaled_logits(q, row0, rows, p, &q_tile);
    const at::Tensor pos_rows = p.pos.narrow(0, row0, rows);
    pos_logit.narrow(0, row0, rows)
        .copy_(S.gather(1, pos_rows.clamp_min(0).unsqueeze(1)).squeeze(1));
    if (symmetric) {
      row_lse.narrow(0, row0, rows).copy_(at::logsumexp(S, {1}));
      const at::Tensor new_max = at::maximum(col_max, S.amax(0));
      col_sum.mul_((col_max - new_max).exp_()).add_((S - new_max.unsqueeze(0)).exp_().sum(0));
      col_max = new_max;
      continue;
    }
    // S <- exp(S - rowmax) in place; then lse = rowmax + log(rowsum).
    const at::Tensor row_max = S.amax(1);
    S.sub_(row_max.unsqueeze(1)).exp_();
    const at::Tensor lse = row_max + S.sum(1).log_();
    row_lse.narrow(0, row0, rows).copy_(lse);
    if (fuse_gradients) {
      // G = c_i * softmax_ij - c_i [j = pos_i], from exp(S - rowmax) without another exp.
      const at::Tensor c_tile = c_rows.narrow(0, row0, rows);
      S.mul_(((row_max - lse).exp_() * c_tile).unsqueeze(1));
      S.scatter_add_(1, pos_rows.clamp_min(0).unsqueeze(1), -c_tile.unsqueeze(1));
      sink.add_tile(row0, q_tile, p.k_acc, S);
    }
  }

  at::Tensor col_lse = col_max + col_sum.log();
  at::Tensor row_loss = row_lse - pos_logit;
  if (symmetric) {
    row_loss = 0.5 * (row_lse + col_lse.index_select(0, p.pos)) - pos_logit;
  }
  row_loss = m > 0 ? row_loss * valid : at::zeros({n}, acc_opts);

  at::Tensor gq = q.new_empty({0}), gk = q.new_empty({0}), gs = scale_t.new_empty({0});
  at::Tensor loss;
  if (reduction == "none") {
    loss = weight.has_value() ? row_loss * w : row_loss;
  } else {
    // A mean over a total weight of exactly 0 is 0, even where a row loss is not finite.
    loss = zero_mean ? at::zeros({}, acc_opts) : (row_loss * c_rows).sum();
    if (fuse_gradients) {
      std::tie(gq, gk, gs) = sink.finish(q, scale_t);
    } else if (grad_mask[0] || grad_mask[1] || grad_mask[2]) {
      std::tie(gq, gk, gs) =
          gradient_sweep(q, k, p, scale_t, c_rows, row_lse, col_lse, symmetric, grad_mask);
    }
  }
  return {loss, row_lse, col_lse, gq, gk, gs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_backward_cpu(
    const at::Tensor& row_grad, const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& pos,
    const at::Tensor& scale_t, const at::Tensor& row_lse, const at::Tensor& col_lse, bool symmetric,
    std::array<bool, 3> grad_mask) {
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  check_inputs(q_in, k, pos, scale_t, symmetric);
  check_dim("contrastive_loss_backward", "row_grad", row_grad, 1);
  check_size("contrastive_loss_backward", "row_grad", row_grad, 0, q_in.size(0), "q.shape[0]");
  const at::Tensor q = q_in.contiguous();
  const Prepared p = prepare(q, k, pos, scale_t);
  // Ignored rows take no gradient, whatever row_grad holds there (a NaN weight included).
  const at::Tensor c_rows =
      at::where(p.pos.ge(0), row_grad.to(p.acc), at::zeros({}, q.options().dtype(p.acc)));
  return gradient_sweep(q, k, p, scale_t, c_rows, row_lse.to(p.acc), col_lse.to(p.acc), symmetric,
                        grad_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(mgccl, CPU, m) {
  m.impl("contrastive_loss", &contrastive_loss_cpu);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_cpu);
}

}  // namespace mgccl
