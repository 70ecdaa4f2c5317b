// CPU kernel of hard-negative mining (DESIGN.md op 2).
//
// Queries are cut into row tiles, handed out to threads by at::parallel_for. A thread
// multiplies its tile with one block of kKeyBlock keys at a time (a single-threaded at::mm_out
// into the thread's [rows, keys] buffer, at most 512 KiB in float32, so it stays in the core's
// L2 cache while scanned) and offers each row's similarities to that row's selection: a
// reservoir of 2 * (skip + num) candidates above a rising bar. The mining options (positive,
// groups, exclude_self, max_sim, margin below the positive) are tests on (i, j, s_ij) made while
// scanning; `skip` drops the first candidates of the finished order. Beyond inputs and outputs
// (O(N * num)) a thread keeps one similarity block and its rows' reservoirs (at most
// kReservoirBytes) and each row's positive similarity.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

#include "checks.h"

namespace mgccl {
namespace {

constexpr const char* kOp = "topk_hard_negatives";
constexpr int64_t kTileRows = 256;
constexpr int64_t kKeyBlock = 512;
constexpr int64_t kReservoirBytes = int64_t{8} << 20;

template <typename acc_t>
struct Candidate {
  acc_t value;
  int64_t key;
};

// Strict total order of candidates, best first: larger similarity, then smaller key index.
template <typename acc_t>
bool better(const Candidate<acc_t>& a, const Candidate<acc_t>& b) {
  return a.value > b.value || (a.value == b.value && a.key < b.key);
}

// The best `keep` (similarity, key) pairs of one row. Candidates that pass the bar are
// appended to a reservoir of 2 * keep slots; when it fills, nth_element keeps the best `keep`
// and the bar rises to the keep-th best similarity. Until then every non-NaN value passes
// (-inf included); afterwards, since keys arrive in ascending order, a later key equal to the
// bar loses to the kept one (ties: smaller index) and only strictly larger values enter.
// NaN similarities never pass, so they are never selected.
template <typename acc_t>
class RowSelection {
 public:
  RowSelection(Candidate<acc_t>* reservoir, int64_t keep) : reservoir_(reservoir), keep_(keep) {}

  bool passes(acc_t v) const { return full_ ? v > bar_ : v >= bar_; }

  void add(acc_t v, int64_t j) {
    reservoir_[size_++] = {v, j};
    if (size_ == 2 * keep_) {
      std::nth_element(reservoir_, reservoir_ + keep_ - 1, reservoir_ + size_, better<acc_t>);
      size_ = keep_;
      bar_ = reservoir_[keep_ - 1].value;
      full_ = true;
    }
  }

  // Drops the best `skip` pairs and writes the next num = width of the output, best first, into
  // value[0..num) and key[0..num); -inf / -1 pad.
  void finish(int64_t skip, int64_t num, acc_t* value, int64_t* key) {
    const int64_t kept = std::min(size_, keep_);
    std::partial_sort(reservoir_, reservoir_ + kept, reservoir_ + size_, better<acc_t>);
    for (int64_t slot = 0; slot < num; ++slot) {
      const int64_t rank = skip + slot;
      value[slot] = rank < kept ? reservoir_[rank].value : -std::numeric_limits<acc_t>::infinity();
      key[slot] = rank < kept ? reservoir_[rank].key : -1;
    }
  }

 private:
  Candidate<acc_t>* reservoir_;
  int64_t keep_;
  int64_t size_ = 0;
  bool full_ = false;
  acc_t bar_ = -std::numeric_limits<acc_t>::infinity();
};

// Which keys row i may return (the mining options of the op's contract).
template <typename acc_t>
struct Exclusions {
  const int64_t* pos = nullptr;      // [N] or null
  const int64_t* q_group = nullptr;  // [N] or null (then k_group is null too)
  const int64_t* k_group = nullptr;  // [M]
  bool exclude_self = false;
  acc_t max_sim = std::numeric_limits<acc_t>::infinity();  // +inf when not given
  const acc_t* margin_bound = nullptr;  // [N] s_i,pos[i] - margin, or null (no margin filter)

  // The per-row part of the tests, gathered once per row.
  struct Row {
    int64_t index, positive, group;
    acc_t bound;  // +inf without a margin filter; NaN keeps every key (s > NaN is false)
  };
  Row row(int64_t i) const {
    return {i, pos ? pos[i] : -1, q_group ? q_group[i] : 0,
            margin_bound ? margin_bound[i] : std::numeric_limits<acc_t>::infinity()};
  }
  bool allowed(int64_t j, acc_t s, const Row& r) const {
    return j != r.positive && !(k_group && k_group[j] == r.group) &&
           !(exclude_self && j == r.index) && !(s > max_sim) && !(s > r.bound);
  }
};

// Offers similarities s[0..keys) of keys j0.. to one row's selection. Most similarities fall
// below the bar once it has risen, so each run of kRun is first tested as a whole (vectorised).
template <typename acc_t>
void scan_row(const acc_t* s, int64_t j0, int64_t keys, const typename Exclusions<acc_t>::Row& row,
              const Exclusions<acc_t>& ex, RowSelection<acc_t>& selection) {
  constexpr int64_t kRun = 16;
  for (int64_t c0 = 0; c0 < keys; c0 += kRun) {
    const int64_t c1 = std::min(c0 + kRun, keys);
    bool any_passes = false;
    for (int64_t c = c0; c < c1; ++c) any_passes |= selection.passes(s[c]);
    if (!any_passes) continue;
    for (int64_t c = c0; c < c1; ++c) {
      if (selection.passes(s[c]) && ex.allowed(j0 + c, s[c], row)) selection.add(s[c], j0 + c);
    }
  }
}

// Mining options beyond the index tensors, as the op receives them.
struct Options {
  bool exclude_self;
  std::optional<double> max_sim, margin;
  int64_t skip;
};

template <typename acc_t>
void select_top(const at::Tensor& q, const at::Tensor& k_acc, const Exclusions<acc_t>& ex,
                int64_t skip, at::Tensor& value, at::Tensor& idx) {
  const int64_t n = q.size(0), m = k_acc.size(0), num = idx.size(1);
  const auto acc = k_acc.scalar_type();
  // Only the first min(skip + num, M) of a row's order can be returned.
  const int64_t keep = std::min(skip + num, m);
  const int64_t reservoir = 2 * keep;
  const int64_t tile_rows = std::clamp<int64_t>(
      kReservoirBytes / (reservoir * int64_t{sizeof(Candidate<acc_t>)}), 1, kTileRows);
  at::parallel_for(0, (n + tile_rows - 1) / tile_rows, 1, [&](int64_t tile0, int64_t tile1) {
    at::Tensor block = at::empty({tile_rows * std::min(kKeyBlock, m)}, k_acc.options());
    std::vector<Candidate<acc_t>> candidates(tile_rows * reservoir);
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t row0 = tile * tile_rows;
      const int64_t rows = std::min(tile_rows, n - row0);
      const at::Tensor q_tile = q.narrow(0, row0, rows).to(acc);
      std::vector<RowSelection<acc_t>> selections;
      std::vector<typename Exclusions<acc_t>::Row> row_tests;
      selections.reserve(rows);
      row_tests.reserve(rows);
      for (int64_t r = 0; r < rows; ++r) {
        selections.emplace_back(candidates.data() + r * reservoir, keep);
        row_tests.push_back(ex.row(row0 + r));
      }
      for (int64_t j0 = 0; j0 < m; j0 += kKeyBlock) {
        const int64_t keys = std::min(kKeyBlock, m - j0);
        at::Tensor S = block.narrow(0, 0, rows * keys).view({rows, keys});
        at::mm_out(S, q_tile, k_acc.narrow(0, j0, keys).t());
        const acc_t* s = S.data_ptr<acc_t>();
        for (int64_t r = 0; r < rows; ++r) {
          scan_row(s + r * keys, j0, keys, row_tests[r], ex, selections[r]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        selections[r].finish(skip, num, value.data_ptr<acc_t>() + (row0 + r) * num,
                             idx.data_ptr<int64_t>() + (row0 + r) * num);
      }
    }
  });
}

// [N] s_i,pos[i] - margin in the accumulation dtype (+inf for rows with pos[i] = -1).
at::Tensor margin_bounds(const at::Tensor& q, const at::Tensor& k_acc, const at::Tensor& pos,
                         double margin) {
  const auto acc = k_acc.scalar_type();
  const at::Tensor valid = pos.ge(0);
  const at::Tensor positive_keys = k_acc.index_select(0, pos.clamp_min(0));
  const at::Tensor pos_sim = (q.to(acc) * positive_keys).sum(1);
  const at::Tensor bound = pos_sim - at::scalar_tensor(margin, pos_sim.options());
  return at::where(valid, bound, at::scalar_tensor(INFINITY, bound.options())).contiguous();
}

template <typename acc_t>
void mine(const at::Tensor& q, const at::Tensor& k_acc, const std::optional<at::Tensor>& pos,
          const std::optional<at::Tensor>& q_group, const std::optional<at::Tensor>& k_group,
          const Options& options, at::Tensor& value, at::Tensor& idx) {
  at::Tensor pos_c, q_group_c, k_group_c, bound;
  Exclusions<acc_t> ex;
  if (pos.has_value()) {
    pos_c = pos->contiguous();
    ex.pos = pos_c.data_ptr<int64_t>();
  }
  if (q_group.has_value()) {
    q_group_c = q_group->contiguous();
    k_group_c = k_group->contiguous();
    ex.q_group = q_group_c.data_ptr<int64_t>();
    ex.k_group = k_group_c.data_ptr<int64_t>();
  }
  ex.exclude_self = options.exclude_self;
  if (options.max_sim.has_value()) ex.max_sim = static_cast<acc_t>(*options.max_sim);
  if (options.margin.has_value()) {
    bound = margin_bounds(q, k_acc, pos_c, *options.margin);
    ex.margin_bound = bound.data_ptr<acc_t>();
  }
  select_top<acc_t>(q, k_acc, ex, options.skip, value, idx);
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, int64_t num,
                  const std::optional<at::Tensor>& pos, const std::optional<at::Tensor>& q_group,
                  const std::optional<at::Tensor>& k_group, const Options& options) {
  check_queries_and_keys(kOp, q, k);
  const int64_t n = q.size(0), m = k.size(0);
  TORCH_CHECK(num >= 0 && num <= m, kOp, ": num should lie in [0, M = ", m, "], got ", num);
  TORCH_CHECK(options.skip >= 0, kOp, ": skip should be >= 0, got ", options.skip);
  TORCH_CHECK(!options.exclude_self || n == m, kOp,
              ": exclude_self=True needs as many queries as keys, got N = ", n, " and M = ", m);
  TORCH_CHECK(!options.max_sim.has_value() || !std::isnan(*options.max_sim), kOp,
              ": max_sim should be a number, got nan");
  TORCH_CHECK(!options.margin.has_value() || !std::isnan(*options.margin), kOp,
              ": margin should be a number, got nan");
  TORCH_CHECK(!options.margin.has_value() || pos.has_value(), kOp,
              ": margin needs pos (the similarity it is measured from), got pos=None");
  if (pos.has_value()) {
    check_row_index(kOp, "pos", *pos, q, n, "q.shape[0]");
    check_index_range(kOp, "pos", *pos, -1, m);
  }
  TORCH_CHECK(q_group.has_value() == k_group.has_value(), kOp,
              ": q_group and k_group should be given together, got only ",
              q_group.has_value() ? "q_group" : "k_group");
  if (q_group.has_value()) {
    check_row_index(kOp, "q_group", *q_group, q, n, "q.shape[0]");
    check_row_index(kOp, "k_group", *k_group, q, m, "k.shape[0]");
  }
}

std::tuple<at::Tensor, at::Tensor> topk_hard_negatives_cpu(
    const at::Tensor& q_in, const at::Tensor& k, int64_t num, const std::optional<at::Tensor>& pos,
    const std::optional<at::Tensor>& q_group, const std::optional<at::Tensor>& k_group,
    bool exclude_self, std::optional<double> max_sim, std::optional<double> margin, int64_t skip) {
  const Options options{exclude_self, max_sim, margin, skip};
  check_inputs(q_in, k, num, pos, q_group, k_group, options);
  const int64_t n = q_in.size(0);
  at::Tensor idx = at::empty({n, num}, q_in.options().dtype(at::kLong));
  at::Tensor sim = at::empty({n, num}, q_in.options().dtype(at::kFloat));
  if (n == 0 || num == 0) return {idx, sim};

  const auto acc = accumulation_type(q_in.scalar_type());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k_acc = k.to(acc).contiguous();
  if (acc == at::kDouble) {
    at::Tensor value = at::empty({n, num}, q.options().dtype(at::kDouble));
    mine<double>(q, k_acc, pos, q_group, k_group, options, value, idx);
    sim.copy_(value);
  } else {
    mine<float>(q, k_acc, pos, q_group, k_group, options, sim, idx);
  }
  return {idx, sim};
}

}  // namespace

TORCH_LIBRARY_IMPL(mgccl, CPU, m) { m.impl("topk_hard_negatives", &topk_hard_negatives_cpu); }

}  // namespace mgccl
