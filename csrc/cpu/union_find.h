// Disjoint sets over the pixels of one image, rooted at their smallest member, for one thread.
//
// The find / unite arithmetic is the one the GPU runs with atomicCAS (common/union_find.h), here
// with plain loads and stores. The root of every set is its smallest element: for pixels in
// raster order that is the region's first pixel, the name DESIGN.md gives a region while
// merging, and compact raster-order labels are a single forward pass, since a pixel's root always
// precedes it (common/compaction.h).
#pragma once

#include <cstdint>
#include <numeric>
#include <vector>

#include "common/compaction.h"
#include "common/union_find.h"

namespace mgccl {

class MinRootUnionFind {
 public:
  explicit MinRootUnionFind(int64_t n) : parent_(n) {
    std::iota(parent_.begin(), parent_.end(), int32_t{0});
  }

  // The root (smallest member) of x's set, halving the path on the way.
  int32_t find(int32_t x) { return find_root<PlainAccess>(parent_.data(), x); }

  // Joins the sets of a and b; false when they already were one set.
  bool unite(int32_t a, int32_t b) { return unite_roots<PlainAccess>(parent_.data(), a, b); }

  // Writes labels[p] in 0..num-1, numbering the sets in raster order of their smallest member,
  // and returns num: the exclusive scan of the root flags, fused with the reads at the roots.
  int64_t compact_labels(int64_t* labels) {
    int64_t num = 0;
    for (int32_t p = 0; p < static_cast<int32_t>(parent_.size()); ++p) {
      const int32_t root = find(p);
      labels[p] = root == p ? num++ : compact_label(labels, root);
    }
    return num;
  }

 private:
  std::vector<int32_t> parent_;
};

}  // namespace mgccl
