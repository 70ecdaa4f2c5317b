// CPU kernel of the hard-negative contrastive loss (DESIGN.md op 3).
//
// Row i's K+1 logits are indexed dot products scale * <q_i, k_j> over j in {pos[i]} and
// neg_idx[i] (-1 entries skipped); the [N, K, D] gathered keys never exist. Working memory is
// O(N * K): the raw dot products and, for gradients, the logit coefficients G = dLoss/dlogit.
// grad_k sums G[i, c] * q_i over all entries (i, c) naming key j; the entries are grouped by
// key (a counting sort in entry order) and each key sums its own list, so threads never share
// an output row and duplicates accumulate in a fixed order: the result is deterministic.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <limits>
#include <vector>

#include "checks.h"
#include "common/logsumexp.h"

namespace mgccl {
namespace {

constexpr const char* kOp = "hard_negative_loss";
constexpr int64_t kRowGrain = 256;

// <a, b> over d elements accumulated in acc_t, in 16 independent partial sums (vectorisable
// without reassociating: the order is fixed).
template <typename scalar_t, typename acc_t>
acc_t dot(const scalar_t* a, const scalar_t* b, int64_t d) {
  constexpr int64_t kLanes = 16;
  std::array<acc_t, kLanes> partial{};
  int64_t e = 0;
  for (; e + kLanes <= d; e += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      partial[l] += static_cast<acc_t>(a[e + l]) * static_cast<acc_t>(b[e + l]);
    }
  }
  acc_t total = 0;
  for (; e < d; ++e) total += static_cast<acc_t>(a[e]) * static_cast<acc_t>(b[e]);
  for (int64_t l = 0; l < kLanes; ++l) total += partial[l];
  return total;
}

// y += alpha * x over d elements.
template <typename scalar_t, typename acc_t>
void axpy(acc_t alpha, const scalar_t* x, acc_t* y, int64_t d) {
  for (int64_t e = 0; e < d; ++e) y[e] += alpha * static_cast<acc_t>(x[e]);
}

// The inputs in the layout the loops read: contiguous, with the key of every (row, entry),
// entry 0 being the positive and entries 1..K the listed negatives.
struct Inputs {
  Inputs(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& pos_in,
         const at::Tensor& neg_in, const at::Tensor& scale_t)
      : q(q_in.contiguous()),
        k(k_in.contiguous()),
        pos(pos_in.contiguous()),
        neg(neg_in.contiguous()),
        n(q.size(0)),
        m(k.size(0)),
        d(q.size(1)),
        entries(neg.size(1) + 1),
        scale(scale_t.item<double>()),
        pos_ptr(pos.data_ptr<int64_t>()),
        neg_ptr(neg.data_ptr<int64_t>()) {}

  int64_t key(int64_t i, int64_t c) const {
    return c == 0 ? pos_ptr[i] : neg_ptr[i * (entries - 1) + c - 1];
  }

  at::Tensor q, k, pos, neg;
  int64_t n, m, d, entries;  // entries = K + 1
  double scale;
  const int64_t* pos_ptr;
  const int64_t* neg_ptr;
};

// Per valid row: raw dot products [N, K+1] (0 at padding), the row log-sum-exp of the scaled
// logits and the row loss lse - logit_pos (0 for ignored rows).
template <typename scalar_t, typename acc_t>
void forward_rows(const Inputs& in, acc_t* dots, acc_t* row_lse, acc_t* row_loss) {
  const scalar_t* q = in.q.data_ptr<scalar_t>();
  const scalar_t* k = in.k.data_ptr<scalar_t>();
  const acc_t s = static_cast<acc_t>(in.scale);
  at::parallel_for(0, in.n, kRowGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      acc_t* dot_i = dots + i * in.entries;
      row_lse[i] = 0;
      row_loss[i] = 0;
      if (in.key(i, 0) < 0) {
        std::fill(dot_i, dot_i + in.entries, acc_t(0));
        continue;
      }
      MaxSum<acc_t> state = MaxSum<acc_t>::empty();
      for (int64_t c = 0; c < in.entries; ++c) {
        const int64_t j = in.key(i, c);
        dot_i[c] = j < 0 ? acc_t(0) : dot<scalar_t, acc_t>(q + i * in.d, k + j * in.d, in.d);
        if (j >= 0) state.add(s * dot_i[c]);
      }
      row_lse[i] = state.logsumexp();
      row_loss[i] = row_lse[i] - s * dot_i[0];
    }
  });
}

// Gradients of sum_i c_rows[i] * loss_i. Overwrites `dots` with the logit coefficients
// G[i, c] = c_i * (softmax_c - [c == 0]), the gradient with respect to the raw dot product
// divided by scale.
template <typename scalar_t, typename acc_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> gradients(const Inputs& in, acc_t* dots,
                                                         const acc_t* row_lse, const acc_t* c_rows,
                                                         const at::Tensor& scale_t,
                                                         std::array<bool, 3> mask) {
  const scalar_t* q = in.q.data_ptr<scalar_t>();
  const scalar_t* k = in.k.data_ptr<scalar_t>();
  const acc_t s = static_cast<acc_t>(in.scale);
  const auto acc_opts = in.q.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor scale_part = at::zeros({in.n}, acc_opts);  // per row: sum_c G[i, c] * dot[i, c]
  acc_t* scale_row = scale_part.data_ptr<acc_t>();
  at::parallel_for(0, in.n, kRowGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      acc_t* g = dots + i * in.entries;
      const bool valid = in.key(i, 0) >= 0;
      for (int64_t c = 0; c < in.entries; ++c) {
        const acc_t raw = g[c];
        const bool listed = valid && in.key(i, c) >= 0;
        g[c] = listed ? row_logit_gradient(s * raw, row_lse[i], c_rows[i], c == 0) : acc_t(0);
        scale_row[i] += g[c] * raw;
      }
    }
  });

  at::Tensor grad_q = in.q.new_empty({0}), grad_k = in.k.new_empty({0});
  if (mask[0]) {
    grad_q = at::empty_like(in.q);
    scalar_t* out = grad_q.data_ptr<scalar_t>();
    at::parallel_for(0, in.n, kRowGrain, [&](int64_t i0, int64_t i1) {
      std::vector<acc_t> row(in.d);
      for (int64_t i = i0; i < i1; ++i) {
        std::fill(row.begin(), row.end(), acc_t(0));
        for (int64_t c = 0; c < in.entries; ++c) {
          const acc_t g = dots[i * in.entries + c];
          if (g != 0) axpy<scalar_t, acc_t>(g, k + in.key(i, c) * in.d, row.data(), in.d);
        }
        for (int64_t e = 0; e < in.d; ++e) out[i * in.d + e] = static_cast<scalar_t>(s * row[e]);
      }
    });
  }
  if (mask[1]) {
    // Entries (i, c) grouped by key, each group in ascending entry order (counting sort).
    std::vector<int64_t> start(in.m + 1, 0);
    for (int64_t i = 0; i < in.n; ++i) {
      for (int64_t c = 0; c < in.entries; ++c) {
        if (dots[i * in.entries + c] != 0) ++start[in.key(i, c) + 1];
      }
    }
    for (int64_t j = 0; j < in.m; ++j) start[j + 1] += start[j];
    std::vector<int64_t> entry(start[in.m]);
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < in.n; ++i) {
      for (int64_t c = 0; c < in.entries; ++c) {
        if (dots[i * in.entries + c] != 0) entry[fill[in.key(i, c)]++] = i * in.entries + c;
      }
    }
    grad_k = at::empty_like(in.k);
    scalar_t* out = grad_k.data_ptr<scalar_t>();
    at::parallel_for(0, in.m, 16, [&](int64_t j0, int64_t j1) {
      std::vector<acc_t> row(in.d);
      for (int64_t j = j0; j < j1; ++j) {
        std::fill(row.begin(), row.end(), acc_t(0));
        for (int64_t p = start[j]; p < start[j + 1]; ++p) {
          const int64_t i = entry[p] / in.entries;
          axpy<scalar_t, acc_t>(dots[entry[p]], q + i * in.d, row.data(), in.d);
        }
        for (int64_t e = 0; e < in.d; ++e) out[j * in.d + e] = static_cast<scalar_t>(s * row[e]);
      }
    });
  }
  at::Tensor grad_scale =
      mask[2] ? scale_part.sum().to(scale_t.scalar_type()) : scale_t.new_empty({0});
  return {grad_q, grad_k, grad_scale};
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
                  const at::Tensor& neg_idx, const at::Tensor& scale) {
  check_queries_and_keys(kOp, q, k);
  check_row_index(kOp, "pos", pos, q, q.size(0), "q.shape[0]");
  check_dim(kOp, "neg_idx", neg_idx, 2);
  check_index_dtype(kOp, "neg_idx", neg_idx);
  check_size(kOp, "neg_idx", neg_idx, 0, q.size(0), "q.shape[0]");
  check_same_device(kOp, "neg_idx", neg_idx, q);
  check_scale_metadata(kOp, scale, q);
  finite_scale(kOp, scale);
  check_index_range(kOp, "pos", pos, -1, k.size(0));
  check_index_range(kOp, "neg_idx", neg_idx, -1, k.size(0));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> hard_negative_loss_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos, const at::Tensor& neg_idx,
    const at::Tensor& scale_t, const std::optional<at::Tensor>& weight, c10::string_view reduction,
    std::array<bool, 3> grad_mask) {
  check_inputs(q, k, pos, neg_idx, scale_t);
  check_reduction(kOp, reduction);
  check_weight(kOp, weight, q);
  const Inputs in(q, k, pos, neg_idx, scale_t);
  const auto acc = accumulation_type(q.scalar_type());
  const auto acc_opts = q.options().dtype(acc);

  const at::Tensor w = row_weights(weight, in.pos, acc);
  const bool fuse_gradients = reduction != "none" && (grad_mask[0] || grad_mask[1] || grad_mask[2]);
  bool zero_mean = false;
  const at::Tensor c_rows = row_coefficients(w, in.pos, reduction, &zero_mean).contiguous();

  at::Tensor dots = at::empty({in.n, in.entries}, acc_opts);
  at::Tensor row_lse = at::empty({in.n}, acc_opts);
  at::Tensor row_loss = at::empty({in.n}, acc_opts);
  at::Tensor gq = q.new_empty({0}), gk = k.new_empty({0}), gs = scale_t.new_empty({0});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_rows<scalar_t, acc_t>(in, dots.data_ptr<acc_t>(), row_lse.data_ptr<acc_t>(),
                                  row_loss.data_ptr<acc_t>());
    if (fuse_gradients) {
      std::tie(gq, gk, gs) =
          gradients<scalar_t, acc_t>(in, dots.data_ptr<acc_t>(), row_lse.data_ptr<acc_t>(),
                                     c_rows.data_ptr<acc_t>(), scale_t, grad_mask);
    }
  });

  at::Tensor loss;
  if (reduction == "none") {
    loss = weight.has_value() ? row_loss * w : row_loss.clone();  // outputs must not alias
  } else {
    // A mean over a total weight of exactly 0 is 0, even where a row loss is not finite.
    loss = zero_mean ? at::zeros({}, acc_opts) : (row_loss * c_rows).sum();
  }
  return {loss, row_loss, gq, gk, gs};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> hard_negative_loss_backward_cpu(
    const at::Tensor& row_grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& pos,
    const at::Tensor& neg_idx, const at::Tensor& scale_t, std::array<bool, 3> grad_mask) {
  check_inputs(q, k, pos, neg_idx, scale_t);
  check_dim("hard_negative_loss_backward", "row_grad", row_grad, 1);
  check_size("hard_negative_loss_backward", "row_grad", row_grad, 0, q.size(0), "q.shape[0]");
  const Inputs in(q, k, pos, neg_idx, scale_t);
  const auto acc = accumulation_type(q.scalar_type());
  const auto acc_opts = q.options().dtype(acc);
  const at::Tensor c_rows = row_grad.to(acc).contiguous();
  at::Tensor dots = at::empty({in.n, in.entries}, acc_opts);
  at::Tensor row_lse = at::empty({in.n}, acc_opts);
  at::Tensor row_loss = at::empty({in.n}, acc_opts);
  std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), kOp, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_rows<scalar_t, acc_t>(in, dots.data_ptr<acc_t>(), row_lse.data_ptr<acc_t>(),
                                  row_loss.data_ptr<acc_t>());
    grads = gradients<scalar_t, acc_t>(in, dots.data_ptr<acc_t>(), row_lse.data_ptr<acc_t>(),
                                       c_rows.data_ptr<acc_t>(), scale_t, grad_mask);
  });
  return grads;
}

}  // namespace

TORCH_LIBRARY_IMPL(mgccl, CPU, m) {
  m.impl("hard_negative_loss", &hard_negative_loss_cpu);
  m.impl("hard_negative_loss_backward", &hard_negative_loss_backward_cpu);
}

}  // namespace mgccl
