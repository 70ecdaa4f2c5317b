// CPU kernel of hard-negative mining (DESIGN.md op 2).
//
// Queries are cut into row tiles, handed out to threads by at::parallel_for. A thread
// multiplies its tile with one block of kKeyBlock keys at a time (a single-threaded at::mm_out
// into the thread's [rows, keys] buffer, at most 512 KiB in float32, so it stays in the core's
// L2 cache while scanned) and offers each row's similarities to that row's selection: a
// reservoir of 2 * num candidates above a rising bar. Beyond inputs and outputs (O(N * num))
// a thread keeps one similarity block and its rows' reservoirs (at most kReservoirBytes).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
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

// The best `num` (similarity, key) pairs of one row. Candidates that beat the bar are appended
// to a reservoir of 2 * num slots; when it fills, nth_element keeps the best num and the bar
// rises to the num-th best similarity. Keys arrive in ascending order, so a later key equal to
// the bar loses to the kept one (ties: smaller index) and only strictly larger values enter.
// Until the reservoir first fills, every similarity but NaN enters (-inf included: a key of
// similarity -inf is allowed and returned); NaN never compares above the bar, so it is never
// selected.
template <typename acc_t>
class RowSelection {
 public:
  RowSelection(Candidate<acc_t>* reservoir, int64_t num) : reservoir_(reservoir), num_(num) {}

  acc_t bar() const { return bar_; }
  // Whether v may enter: v >= -inf (not NaN) while the reservoir has never filled, else v > bar.
  bool open() const { return open_; }
  bool admits(acc_t v) const { return open_ ? v >= bar_ : v > bar_; }

  void add(acc_t v, int64_t j) {
    reservoir_[size_++] = {v, j};
    if (size_ == 2 * num_) {
      std::nth_element(reservoir_, reservoir_ + num_ - 1, reservoir_ + size_, better<acc_t>);
      size_ = num_;
      bar_ = reservoir_[num_ - 1].value;
      open_ = false;
    }
  }

  // Writes the best num pairs, best first, into value[0..num) and key[0..num); -inf / -1 pad.
  void finish(acc_t* value, int64_t* key) {
    const int64_t kept = std::min(size_, num_);
    std::partial_sort(reservoir_, reservoir_ + kept, reservoir_ + size_, better<acc_t>);
    for (int64_t slot = 0; slot < num_; ++slot) {
      value[slot] = slot < kept ? reservoir_[slot].value : -std::numeric_limits<acc_t>::infinity();
      key[slot] = slot < kept ? reservoir_[slot].key : -1;
    }
  }

 private:
  Candidate<acc_t>* reservoir_;
  int64_t num_;
  int64_t size_ = 0;
  acc_t bar_ = -std::numeric_limits<acc_t>::infinity();
  bool open_ = true;
};

// Which keys row i may return: not its positive, not a key of its group.
struct Exclusions {
  const int64_t* pos = nullptr;      // [N] or null
  const int64_t* q_group = nullptr;  // [N] or null (then k_group is null too)
  const int64_t* k_group = nullptr;  // [M]

  int64_t positive(int64_t i) const { return pos ? pos[i] : -1; }
  bool allowed(int64_t j, int64_t positive, int64_t group) const {
    return j != positive && !(k_group && k_group[j] == group);
  }
};

// Offers similarities s[0..keys) of keys j0.. to one row's selection. Most similarities fall
// below the bar once it has risen, so each run of kRun is first tested as a whole (vectorised).
template <typename acc_t>
void scan_row(const acc_t* s, int64_t j0, int64_t keys, int64_t row, const Exclusions& ex,
              RowSelection<acc_t>& selection) {
  constexpr int64_t kRun = 16;
  const int64_t positive = ex.positive(row);
  const int64_t group = ex.q_group ? ex.q_group[row] : 0;
  for (int64_t c0 = 0; c0 < keys; c0 += kRun) {
    const int64_t c1 = std::min(c0 + kRun, keys);
    if (!selection.open()) {
      const acc_t bar = selection.bar();
      bool any_above = false;
      for (int64_t c = c0; c < c1; ++c) any_above |= s[c] > bar;
      if (!any_above) continue;
    }
    for (int64_t c = c0; c < c1; ++c) {
      if (selection.admits(s[c]) && ex.allowed(j0 + c, positive, group)) {
        selection.add(s[c], j0 + c);
      }
    }
  }
}

template <typename acc_t>
void select_top(const at::Tensor& q, const at::Tensor& k_acc, const Exclusions& ex,
                at::Tensor& value, at::Tensor& idx) {
  const int64_t n = q.size(0), m = k_acc.size(0), num = idx.size(1);
  const auto acc = k_acc.scalar_type();
  const int64_t reservoir = 2 * num;
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
      selections.reserve(rows);
      for (int64_t r = 0; r < rows; ++r) {
        selections.emplace_back(candidates.data() + r * reservoir, num);
      }
      for (int64_t j0 = 0; j0 < m; j0 += kKeyBlock) {
        const int64_t keys = std::min(kKeyBlock, m - j0);
        at::Tensor S = block.narrow(0, 0, rows * keys).view({rows, keys});
        at::mm_out(S, q_tile, k_acc.narrow(0, j0, keys).t());
        const acc_t* s = S.data_ptr<acc_t>();
        for (int64_t r = 0; r < rows; ++r) {
          scan_row(s + r * keys, j0, keys, row0 + r, ex, selections[r]);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        selections[r].finish(value.data_ptr<acc_t>() + (row0 + r) * num,
                             idx.data_ptr<int64_t>() + (row0 + r) * num);
      }
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, int64_t num,
                  const std::optional<at::Tensor>& pos, const std::optional<at::Tensor>& q_group,
                  const std::optional<at::Tensor>& k_group) {
  check_queries_and_keys(kOp, q, k);
  const int64_t n = q.size(0), m = k.size(0);
  TORCH_CHECK(num >= 0 && num <= m, kOp, ": num should lie in [0, M = ", m, "], got ", num);
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
    const std::optional<at::Tensor>& q_group, const std::optional<at::Tensor>& k_group) {
  check_inputs(q_in, k, num, pos, q_group, k_group);
  const int64_t n = q_in.size(0);
  at::Tensor idx = at::empty({n, num}, q_in.options().dtype(at::kLong));
  at::Tensor sim = at::empty({n, num}, q_in.options().dtype(at::kFloat));
  if (n == 0 || num == 0) return {idx, sim};

  const auto acc = accumulation_type(q_in.scalar_type());
  const at::Tensor q = q_in.contiguous();
  const at::Tensor k_acc = k.to(acc).contiguous();
  at::Tensor pos_c, q_group_c, k_group_c;
  Exclusions ex;
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
  if (acc == at::kDouble) {
    at::Tensor value = at::empty({n, num}, q.options().dtype(at::kDouble));
    select_top<double>(q, k_acc, ex, value, idx);
    sim.copy_(value);
  } else {
    select_top<float>(q, k_acc, ex, sim, idx);
  }
  return {idx, sim};
}

}  // namespace

TORCH_LIBRARY_IMPL(mgccl, CPU, m) { m.impl("topk_hard_negatives", &topk_hard_negatives_cpu); }

}  // namespace mgccl
