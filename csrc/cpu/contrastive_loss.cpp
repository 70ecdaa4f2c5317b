// CPU kernel of the fused similarity + contrastive loss (DESIGN.md op 1): the CPU side of
// contrastive_driver.h.
//
// The products R = q k^T are formed one row tile at a time ([rows, M], at most kTileBytes) by
// at::mm in the accumulation dtype into one reused workspace; the loops below read the logits
// S = scale * R from it, reduce them to per-row (and, when symmetric, per-column) log-sum-exps
// and turn the tile into the gradient in place, rows (or column blocks) in parallel. The
// per-element math is csrc/common/logsumexp.h's, the same the CUDA kernel runs. The N x M matrix
// never exists.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "common/logsumexp.h"
#include "contrastive_driver.h"

namespace mgccl {
namespace {

constexpr int64_t kRowGrain = 8;
constexpr int64_t kColumnBlock = 256;

template <typename T>
T* data_or_null(const at::Tensor& t, int64_t offset) {
  return t.defined() ? t.data_ptr<T>() + offset : nullptr;
}

// One row of products R_i. [m] -> scale * G_i., where G = dLoss/dS (row_logit_gradient or
// symmetric_logit_gradient); returns sum_j G_ij R_ij, the row's share of dLoss/dscale.
template <typename acc_t, bool kSymmetric>
acc_t write_row_gradient(acc_t* row, int64_t m, acc_t scale, acc_t row_lse, acc_t c, int64_t pos,
                         const acc_t* col_lse, const acc_t* c_cols) {
  acc_t scale_part = 0;
  for (int64_t j = 0; j < m; ++j) {
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

struct CpuContrastive {
  // Larger tiles keep the matrix products near torch.mm's speed.
  static constexpr int64_t kTileBytes = int64_t{64} << 20;

  // Keys are held in the accumulation dtype: the products run in float32 (float64).
  static ContrastiveInputs prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                                   const at::Tensor& scale) {
    const auto acc = accumulation_type(q.scalar_type());
    return {q.contiguous(), k.to(acc).contiguous(), pos.contiguous(), scale.to(acc), acc};
  }

  static at::Tensor products(const ContrastiveInputs& in, at::Tensor& workspace, int64_t row0,
                             int64_t rows) {
    at::Tensor out = workspace.narrow(0, 0, rows);
    at::mm_out(out, in.q.narrow(0, row0, rows).to(in.acc), in.k.t());
    return out;
  }

  static void row_stats(at::Tensor& products, int64_t row0, const ContrastiveInputs& in,
                        const at::Tensor& c_rows, at::Tensor& row_lse, at::Tensor& pos_logit,
                        const at::Tensor& scale_rows) {
    const int64_t rows = products.size(0), m = products.size(1);
    AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "contrastive_loss_row_stats", [&] {
      scalar_t* tile = products.data_ptr<scalar_t>();
      const scalar_t s = in.scale.item<scalar_t>();
      const int64_t* pos = in.pos.data_ptr<int64_t>() + row0;
      const scalar_t* c = data_or_null<scalar_t>(c_rows, row0);
      scalar_t* lse_out = row_lse.data_ptr<scalar_t>() + row0;
      scalar_t* positive = pos_logit.data_ptr<scalar_t>() + row0;
      scalar_t* scale_out = data_or_null<scalar_t>(scale_rows, row0);
      at::parallel_for(0, rows, kRowGrain, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          scalar_t* row = tile + i * m;
          const int64_t p = pos[i];
          positive[i] = s * row[p < 0 ? 0 : p];
          MaxSum<scalar_t> state = MaxSum<scalar_t>::empty();
          for (int64_t j = 0; j < m; ++j) state.add(s * row[j]);
          lse_out[i] = state.logsumexp();
          if (c == nullptr) continue;
          const scalar_t part =
              write_row_gradient<scalar_t, false>(row, m, s, lse_out[i], c[i], p, nullptr, nullptr);
          if (scale_out != nullptr) scale_out[i] = part;
        }
      });
    });
  }

  static void column_stats(const at::Tensor& products, const ContrastiveInputs& in,
                           at::Tensor& col_max, at::Tensor& col_sum) {
    const int64_t rows = products.size(0), m = products.size(1);
    AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "contrastive_loss_column_stats", [&] {
      const scalar_t* tile = products.data_ptr<scalar_t>();
      const scalar_t s = in.scale.item<scalar_t>();
      scalar_t* running_max = col_max.data_ptr<scalar_t>();
      scalar_t* running_sum = col_sum.data_ptr<scalar_t>();
      at::parallel_for(0, m, kColumnBlock, [&](int64_t j0, int64_t j1) {
        std::vector<MaxSum<scalar_t>> states(j1 - j0, MaxSum<scalar_t>::empty());
        for (int64_t i = 0; i < rows; ++i) {  // rows in order, columns contiguous
          const scalar_t* row = tile + i * m;
          for (int64_t j = j0; j < j1; ++j) states[j - j0].add(s * row[j]);
        }
        for (int64_t j = j0; j < j1; ++j) {
          const MaxSum<scalar_t> total =
              merge_max_sum(MaxSum<scalar_t>{running_max[j], running_sum[j]}, states[j - j0]);
          running_max[j] = total.max;
          running_sum[j] = total.sum;
        }
      });
    });
  }

  static void logit_gradient(at::Tensor& products, int64_t row0, const ContrastiveInputs& in,
                             const at::Tensor& c_rows, const at::Tensor& row_lse,
                             const at::Tensor& col_lse, const at::Tensor& c_cols,
                             const at::Tensor& scale_rows, bool symmetric) {
    const int64_t rows = products.size(0), m = products.size(1);
    AT_DISPATCH_FLOATING_TYPES(products.scalar_type(), "contrastive_loss_logit_gradient", [&] {
      scalar_t* tile = products.data_ptr<scalar_t>();
      const scalar_t s = in.scale.item<scalar_t>();
      const int64_t* pos = in.pos.data_ptr<int64_t>() + row0;
      const scalar_t* c = c_rows.data_ptr<scalar_t>() + row0;
      const scalar_t* lse = row_lse.data_ptr<scalar_t>() + row0;
      const scalar_t* columns = data_or_null<scalar_t>(col_lse, 0);
      const scalar_t* c_col = data_or_null<scalar_t>(c_cols, 0);
      scalar_t* scale_out = data_or_null<scalar_t>(scale_rows, row0);
      at::parallel_for(0, rows, kRowGrain, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
          scalar_t* row = tile + i * m;
          const scalar_t part = symmetric ? write_row_gradient<scalar_t, true>(
                                                row, m, s, lse[i], c[i], pos[i], columns, c_col)
                                          : write_row_gradient<scalar_t, false>(
                                                row, m, s, lse[i], c[i], pos[i], nullptr, nullptr);
          if (scale_out != nullptr) scale_out[i] = part;
        }
      });
    });
  }

  static void add_gradients(const ContrastiveInputs& in, int64_t row0, const at::Tensor& dR,
                            at::Tensor& grad_q, at::Tensor& grad_k) {
    const int64_t rows = dR.size(0);
    if (grad_q.defined()) {
      at::Tensor out = grad_q.narrow(0, row0, rows);
      if (out.scalar_type() == dR.scalar_type()) {
        at::mm_out(out, dR, in.k);
      } else {
        out.copy_(at::mm(dR, in.k));
      }
    }
    if (grad_k.defined()) grad_k.addmm_(dR.t(), in.q.narrow(0, row0, rows).to(in.acc));
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_loss_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                     const at::Tensor& scale, const std::optional<at::Tensor>& weight,
                     c10::string_view reduction, bool symmetric, std::array<bool, 3> grad_mask) {
  return contrastive_loss_driver<CpuContrastive>(q, k, pos, scale, weight, reduction, symmetric,
                                                 grad_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> contrastive_loss_backward_cpu(
    const at::Tensor& row_grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
    const at::Tensor& scale, const at::Tensor& row_lse, const at::Tensor& col_lse, bool symmetric,
    std::array<bool, 3> grad_mask) {
  return contrastive_loss_backward_driver<CpuContrastive>(row_grad, q, k, pos, scale, row_lse,
                                                          col_lse, symmetric, grad_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(mgccl, CPU, m) {
  m.impl("contrastive_loss", &contrastive_loss_cpu);
  m.impl("contrastive_loss_backward", &contrastive_loss_backward_cpu);
}

}  // namespace mgccl
