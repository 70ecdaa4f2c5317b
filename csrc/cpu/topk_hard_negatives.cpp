// CPU kernel of hard-negative mining (DESIGN.md op 2).
//
// Queries are cut into row tiles of kTileRows, handed out to threads by at::parallel_for. A
// thread multiplies its tile with one block of kKeyBlock keys at a time (a single-threaded
// at::mm_out into the thread's [rows, keys] buffer, 512 KiB in float32, so it stays in the
// core's L2 cache while scanned) and feeds every row's similarities to that row's bounded heap.
// The heaps live in the outputs themselves, so beyond inputs and outputs (O(N * num)) the kernel
// keeps one block per thread.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "checks.h"

namespace mgccl {
namespace {

constexpr const char* kOp = "topk_hard_negatives";
constexpr int64_t kTileRows = 256;
constexpr int64_t kKeyBlock = 512;

// The best `capacity` (similarity, key) pairs of one row seen so far, stored in `value` and
// `key` as a heap whose root is the worst pair: the smaller similarity, and on equal
// similarities the larger key index, is worse.
template <typename acc_t>
class RowSelection {
 public:
  RowSelection(acc_t* value, int64_t* key, int64_t capacity)
      : value_(value), key_(key), capacity_(capacity) {}

  bool full() const { return size_ == capacity_; }
  acc_t worst() const { return value_[0]; }

  void push(acc_t v, int64_t j) {
    int64_t hole = size_++;
    while (hole > 0) {
      const int64_t parent = (hole - 1) / 2;
      if (!worse(v, j, value_[parent], key_[parent])) break;
      move(parent, hole);
      hole = parent;
    }
    value_[hole] = v;
    key_[hole] = j;
  }

  // Replaces the worst pair by (v, j), which the caller knows to be better than it.
  void replace_worst(acc_t v, int64_t j) { sift_down(0, size_, v, j); }

  // Sorts the kept pairs best first (heap sort: the worst goes last) and pads with -1 / -inf.
  void finish() {
    for (int64_t end = size_ - 1; end > 0; --end) {
      const acc_t v = value_[end];
      const int64_t j = key_[end];
      move(0, end);
      sift_down(0, end, v, j);
    }
    for (int64_t slot = size_; slot < capacity_; ++slot) {
      value_[slot] = -std::numeric_limits<acc_t>::infinity();
      key_[slot] = -1;
    }
  }

 private:
  static bool worse(acc_t va, int64_t ja, acc_t vb, int64_t jb) {
    return va < vb || (va == vb && ja > jb);
  }

  void move(int64_t from, int64_t to) {
    value_[to] = value_[from];
    key_[to] = key_[from];
  }

  // Puts (v, j) into the heap of the first `size` slots, starting at the empty slot `hole`.
  void sift_down(int64_t hole, int64_t size, acc_t v, int64_t j) {
    while (true) {
      int64_t child = 2 * hole + 1;
      if (child >= size) break;
      if (child + 1 < size &&
          worse(value_[child + 1], key_[child + 1], value_[child], key_[child])) {
        ++child;
      }
      if (!worse(value_[child], key_[child], v, j)) break;
      move(child, hole);
      hole = child;
    }
    value_[hole] = v;
    key_[hole] = j;
  }

  acc_t* value_;
  int64_t* key_;
  int64_t capacity_;
  int64_t size_ = 0;
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

// Feeds similarities s[0..keys) of keys j0.. to one row's selection. Keys arrive in ascending
// order, so a similarity equal to the current worst never displaces it (ties: smaller index).
template <typename acc_t>
void scan_row(const acc_t* s, int64_t j0, int64_t keys, int64_t row, const Exclusions& ex,
              RowSelection<acc_t>& selection) {
  const int64_t positive = ex.positive(row);
  const int64_t group = ex.q_group ? ex.q_group[row] : 0;
  int64_t c = 0;
  for (; c < keys && !selection.full(); ++c) {
    const acc_t v = s[c];
    if (v == v && ex.allowed(j0 + c, positive, group)) selection.push(v, j0 + c);
  }
  if (c == keys) return;
  acc_t bar = selection.worst();
  for (; c < keys; ++c) {
    const acc_t v = s[c];
    if (v > bar && ex.allowed(j0 + c, positive, group)) {
      selection.replace_worst(v, j0 + c);
      bar = selection.worst();
    }
  }
}

template <typename acc_t>
void select_top(const at::Tensor& q, const at::Tensor& k_acc, const Exclusions& ex,
                at::Tensor& value, at::Tensor& idx) {
  const int64_t n = q.size(0), m = k_acc.size(0), num = idx.size(1);
  const auto acc = k_acc.scalar_type();
  at::parallel_for(0, (n + kTileRows - 1) / kTileRows, 1, [&](int64_t tile0, int64_t tile1) {
    at::Tensor block = at::empty({kTileRows * std::min(kKeyBlock, m)}, k_acc.options());
    for (int64_t tile = tile0; tile < tile1; ++tile) {
      const int64_t row0 = tile * kTileRows;
      const int64_t rows = std::min(kTileRows, n - row0);
      const at::Tensor q_tile = q.narrow(0, row0, rows).to(acc);
      std::vector<RowSelection<acc_t>> selections;
      selections.reserve(rows);
      for (int64_t r = 0; r < rows; ++r) {
        selections.emplace_back(value.data_ptr<acc_t>() + (row0 + r) * num,
                                idx.data_ptr<int64_t>() + (row0 + r) * num, num);
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
      for (auto& selection : selections) selection.finish();
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, int64_t num,
                  const std::optional<at::Tensor>& pos, const std::optional<at::Tensor>& q_group,
                  const std::optional<at::Tensor>& k_group) {
  check_dim(kOp, "q", q, 2);
  check_dim(kOp, "k", k, 2);
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), kOp, ": q should be a floating tensor, got ",
              q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type(), kOp, ": k has dtype ", k.scalar_type(),
              " but q has dtype ", q.scalar_type());
  check_size(kOp, "k", k, 1, q.size(1), "q.shape[1]");
  check_same_device(kOp, "k", k, q);
  const int64_t n = q.size(0), m = k.size(0);
  TORCH_CHECK(num >= 0 && num <= m, kOp, ": num should lie in [0, M = ", m, "], got ", num);
  if (pos.has_value()) {
    check_dim(kOp, "pos", *pos, 1);
    check_index_dtype(kOp, "pos", *pos);
    check_size(kOp, "pos", *pos, 0, n, "q.shape[0]");
    check_same_device(kOp, "pos", *pos, q);
    check_index_range(kOp, "pos", *pos, -1, m);
  }
  TORCH_CHECK(q_group.has_value() == k_group.has_value(), kOp,
              ": q_group and k_group should be given together, got only ",
              q_group.has_value() ? "q_group" : "k_group");
  if (q_group.has_value()) {
    check_dim(kOp, "q_group", *q_group, 1);
    check_dim(kOp, "k_group", *k_group, 1);
    check_index_dtype(kOp, "q_group", *q_group);
    check_index_dtype(kOp, "k_group", *k_group);
    check_size(kOp, "q_group", *q_group, 0, n, "q.shape[0]");
    check_size(kOp, "k_group", *k_group, 0, m, "k.shape[0]");
    check_same_device(kOp, "q_group", *q_group, q);
    check_same_device(kOp, "k_group", *k_group, q);
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
