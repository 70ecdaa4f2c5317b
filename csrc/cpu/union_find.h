// Disjoint sets over the pixels of one image, rooted at their smallest member.
//
// unite() links the larger root under the smaller one, so the root of every set is its
// smallest element: for pixels in raster order that is the region's first pixel, the name
// DESIGN.md gives a region while merging. That also makes compact raster-order labels a single
// forward pass, since a pixel's root always precedes it.
#pragma once

#include <cstdint>
#include <numeric>
#include <utility>
#include <vector>

namespace mgccl {

class MinRootUnionFind {
 public:
  explicit MinRootUnionFind(int64_t n) : parent_(n) {
    std::iota(parent_.begin(), parent_.end(), int32_t{0});
  }

  // The root (smallest member) of x's set, halving the path on the way.
  int32_t find(int32_t x) {
    while (parent_[x] != x) {
      parent_[x] = parent_[parent_[x]];
      x = parent_[x];
    }
    return x;
  }

  // Joins the sets of a and b; false when they already were one set.
  bool unite(int32_t a, int32_t b) {
    a = find(a);
    b = find(b);
    if (a == b) return false;
    if (a < b) std::swap(a, b);
    parent_[a] = b;
    return true;
  }

  // Writes labels[p] in 0..num-1, numbering the sets in raster order of their smallest member,
  // and returns num.
  int64_t compact_labels(int64_t* labels) {
    int64_t num = 0;
    for (int32_t p = 0; p < static_cast<int32_t>(parent_.size()); ++p) {
      const int32_t root = find(p);
      labels[p] = root == p ? num++ : labels[root];
    }
    return num;
  }

 private:
  std::vector<int32_t> parent_;
};

}  // namespace mgccl
