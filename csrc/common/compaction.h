// Compact raster-order labels from a min-rooted union-find (union_find.h).
//
// Every set is rooted at its smallest member, so the regions in raster order of their first
// pixels are the roots in index order: a region's label is the number of roots before its root,
// the exclusive prefix sum of the root flags. The CPU runs that sum in one forward pass (a
// pixel's root never comes after it); the GPU flags the roots, scans the flags per image and
// reads each pixel's label at its root.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace mgccl {

// 1 when p is the root (first pixel) of its region; parent must be fully flattened or p's
// entry untouched since the last unite.
MGCCL_HOST_DEVICE inline int32_t root_flag(const int32_t* parent, int32_t p) {
  return parent[p] == p ? 1 : 0;
}

// The label of a pixel whose root is `root`, given roots_before[r]: the number of roots of the
// image with index < r (the exclusive scan of root_flag).
template <typename index_t>
MGCCL_HOST_DEVICE inline int64_t compact_label(const index_t* roots_before, int32_t root) {
  return static_cast<int64_t>(roots_before[root]);
}

}  // namespace mgccl
