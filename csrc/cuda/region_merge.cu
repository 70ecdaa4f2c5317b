// CUDA kernels of region merging (DESIGN.md op 5): region_merge (single and average linkage)
// and region_auto_threshold, the twins of csrc/cpu/region_merge.cpp over the same host driver
// (region_drivers.h) and the same per-element code (csrc/common/), so labels and counts equal
// the CPU kernel's bitwise.
//
// All images of a batch run together: a pixel is named by its global index b * H*W + p (int32),
// and since every set is rooted at its smallest member, roots never leave their image.
//
// Edge similarities: one thread per pixel sums its squared norm and its forward neighbours' dot
// products over the channels in the order of common/pixel_graph.h (reads coalesced over
// pixels), with rounding pinned (exact_*), so every similarity equals the CPU's bit for bit.
//
// Single linkage is a connected-components labelling of the graph of edges at or above the
// threshold. Of the GPU union-find schemes we take ECL-CC's (Jaiganesh & Burtscher 2018):
// initialise every pixel's parent to its smallest connected earlier neighbour, hook with one
// atomicCAS of the larger root under the smaller (lock-free, common/union_find.h), halve paths
// in every find, then flatten. Playne & Hawick's and Allegretti et al.'s block-based BKE/BUF
// win on binary images by merging 2x2 blocks whose pixels are connected by value; here
// connectivity is a per-edge decision (a thresholded similarity), so a block carries no
// precomputable connectivity and their block labelling degenerates to per-pixel unions plus
// bookkeeping. ECL-CC works on any graph, needs one int32 per pixel and no shared-memory
// phase, and its "hook larger root under smaller" is exactly the min-root rule that makes the
// CPU's canonical labels a prefix sum of root flags (common/compaction.h).
//
// Average linkage runs the CPU's rounds on the whole batch at once (a round that merges nothing
// in an image leaves it unchanged, so global rounds equal per-image ones). Each round:
//   1. every edge offers each endpoint the other, as a packed 64-bit key (order-preserving
//      similarity bits, inverted name: common/linkage_pick.h) taken with one atomicMax
//      (float64: the best similarity, then the smallest name reaching it);
//   2. every region whose pick reaches its image's threshold unites with it (atomicCAS);
//      a device flag says whether anything merged, and the host stops when nothing did;
//   3. regions are flattened to their roots; members are stably sorted by root and each merged
//      root sums its members' feature sums in ascending order (a segmented sum in the CPU's
//      order), then recomputes its norm in the lane order of common/linkage_pick.h;
//   4. edges are renamed to roots: self-loops drop, edges between untouched regions keep their
//      similarity, the others are deduplicated (sorted 64-bit pair keys) and get the new cosine
//      (one warp per edge, lane-ordered sums).
// Labels: root flags, a per-image exclusive scan, each pixel's label read at its root.
//
// region_auto_threshold: per image, the median of the edge similarities and the median of their
// absolute deviations, each an exact order statistic found as on the CPU: a per-image histogram
// over common/order_statistic.h's bins (atomicAdd), the target bin by the shared walk, then a
// sort of that bin's few values only.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/compaction.h"
#include "common/linkage_pick.h"
#include "common/order_statistic.h"
#include "common/pixel_graph.h"
#include "common/union_find.h"
#include "region_drivers.h"

namespace mgccl {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t work, int threads = kThreads) {
  return static_cast<unsigned>((work + threads - 1) / threads);
}

// ---------------------------------------------------------------------------------------------
// Pixel graph

// norm [B*n]: each pixel's L2 norm; sim [directions, B*n]: the cosine of the edge p -> p +
// offset(d) (0 where that neighbour does not exist). One thread per pixel.
template <typename scalar_t, typename acc_t>
__global__ void pixel_norm_kernel(const scalar_t* feat, int64_t batch, int64_t channels, Grid grid,
                                  acc_t* norm) {
  const int64_t n = grid.pixels();
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= batch * n) return;
  const int64_t b = g / n, p = g % n;
  norm[g] = exact_sqrt(channel_products<acc_t>(feat + b * channels * n, channels, n, p, 0));
}

template <typename scalar_t, typename acc_t>
__global__ void edge_similarity_kernel(const scalar_t* feat, int64_t batch, int64_t channels,
                                       Grid grid, const acc_t* norm, acc_t* sim) {
  const int64_t n = grid.pixels();
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= batch * n) return;
  const int64_t b = g / n, p = g % n;
  const int64_t y = p / grid.width, x = p % grid.width;
  const scalar_t* image = feat + b * channels * n;
  for (int d = 0; d < grid.directions; ++d) {
    acc_t s = 0;
    if (grid.has_neighbour(y, x, d)) {
      const int64_t off = grid.offset(d);
      s = cosine(channel_products<acc_t>(image, channels, n, p, off), norm[g], norm[g + off]);
    }
    sim[d * batch * n + g] = s;
  }
}

// The graph of a batch: pixel norms and edge similarities.
struct BatchGraph {
  at::Tensor norm;  // [B*n] acc
  at::Tensor sim;   // [directions, B*n] acc
};

BatchGraph batch_graph(const at::Tensor& feat, const Grid& grid) {
  const int64_t batch = feat.size(0), channels = feat.size(1), total = batch * grid.pixels();
  const auto acc = accumulation_type(feat.scalar_type());
  BatchGraph graph{at::empty({total}, feat.options().dtype(acc)),
                   at::empty({grid.directions, total}, feat.options().dtype(acc))};
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, feat.scalar_type(), "region_graph", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        pixel_norm_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            feat.const_data_ptr<scalar_t>(), batch, channels, grid, graph.norm.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        edge_similarity_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            feat.const_data_ptr<scalar_t>(), batch, channels, grid, graph.norm.data_ptr<acc_t>(),
            graph.sim.data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  return graph;
}

// [H*W * directions] bool on the device: which (d, p) edges exist (the same in every image).
at::Tensor edge_mask(const Grid& grid, const at::TensorOptions& options) {
  const int64_t n = grid.pixels();
  const at::Tensor p = at::arange(n, options.dtype(at::kLong));
  const at::Tensor y = p.div(grid.width, "floor"), x = p.remainder(grid.width);
  std::vector<at::Tensor> rows;
  for (int d = 0; d < grid.directions; ++d) {
    const at::Tensor below = y.lt(grid.height - 1);
    const at::Tensor right = x.lt(grid.width - 1);
    switch (d) {
      case 0:
        rows.push_back(right);
        break;
      case 1:
        rows.push_back(below);
        break;
      case 2:
        rows.push_back(below.logical_and(right));
        break;
      default:
        rows.push_back(below.logical_and(x.gt(0)));
    }
  }
  return at::stack(rows);  // [directions, n]
}

// ---------------------------------------------------------------------------------------------
// Auto threshold

template <typename acc_t>
__global__ void histogram_kernel(const acc_t* values, int64_t batch, int64_t per_image, acc_t low,
                                 acc_t scale, int32_t* counts) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= batch * per_image) return;
  const int64_t b = e / per_image;
  const acc_t v = values[e];
  if (v != v) return;  // NaN similarities are left out, as on the CPU
  atomicAdd(counts + b * kOrderBins + order_bin(v, low, scale), 1);
}

// One thread per image: the bin holding its k[b]-th value and the count below it; target -1
// for an image without values (k[b] < 0).
__global__ void target_bin_kernel(const int32_t* counts, int64_t batch, const int64_t* k,
                                  int32_t* target, int64_t* before) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  if (k[b] < 0) {
    target[b] = -1;
    before[b] = 0;
    return;
  }
  target[b] = target_bin(counts + b * kOrderBins, k[b], before + b);
}

// Copies each image's values of its target bin to candidates [B, width] (padded beforehand).
template <typename acc_t>
__global__ void gather_bin_kernel(const acc_t* values, int64_t batch, int64_t per_image, acc_t low,
                                  acc_t scale, const int32_t* target, int32_t* fill, int64_t width,
                                  acc_t* candidates) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= batch * per_image) return;
  const int64_t b = e / per_image;
  const acc_t v = values[e];
  if (v != v || order_bin(v, low, scale) != target[b]) return;
  const int32_t slot = atomicAdd(fill + b, 1);
  candidates[b * width + slot] = v;
}

// The k[b]-th smallest of the non-NaN values of every row b of values [B, E] (acc dtype), exactly:
// [B] acc (undefined where k[b] < 0: no values).
at::Tensor kth_smallest_rows(const at::Tensor& values, const at::Tensor& k, double low,
                             double high) {
  const int64_t batch = values.size(0), per_image = values.size(1);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto int_opts = values.options().dtype(at::kInt);
  at::Tensor counts = at::zeros({batch, kOrderBins}, int_opts);
  at::Tensor target = at::empty({batch}, int_opts);
  at::Tensor before = at::empty({batch}, values.options().dtype(at::kLong));
  at::Tensor result;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "region_order_statistic", [&] {
    const scalar_t lo = static_cast<scalar_t>(low);
    const scalar_t scale = order_scale(lo, static_cast<scalar_t>(high));
    const int64_t total = batch * per_image;
    histogram_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        values.data_ptr<scalar_t>(), batch, per_image, lo, scale, counts.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    target_bin_kernel<<<blocks_for(batch), kThreads, 0, stream>>>(
        counts.data_ptr<int32_t>(), batch, k.data_ptr<int64_t>(), target.data_ptr<int32_t>(),
        before.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor in_bin =
        counts.gather(1, target.clamp_min(0).to(at::kLong).unsqueeze(1)).squeeze(1);
    const int64_t width = std::max<int64_t>(1, in_bin.max().item<int32_t>());
    at::Tensor candidates =
        at::full({batch, width}, std::numeric_limits<scalar_t>::infinity(), values.options());
    at::Tensor fill = at::zeros({batch}, int_opts);
    gather_bin_kernel<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        values.data_ptr<scalar_t>(), batch, per_image, lo, scale, target.data_ptr<int32_t>(),
        fill.data_ptr<int32_t>(), width, candidates.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor sorted = std::get<0>(candidates.sort(1));
    result = sorted.gather(1, (k - before).clamp_min(0).unsqueeze(1)).squeeze(1);
  });
  return result;
}

template <typename acc_t>
__global__ void deviation_kernel(acc_t* values, int64_t batch, int64_t per_image,
                                 const acc_t* median, acc_t* deviation) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= batch * per_image) return;
  const acc_t d = exact_add(values[e], -median[e / per_image]);
  deviation[e] = d < acc_t(0) ? -d : (d == acc_t(0) ? acc_t(0) : d);  // std::abs: +0 for -0
}

template <typename acc_t>
__global__ void threshold_rule_kernel(const acc_t* median, const acc_t* mad, int64_t batch,
                                      double* out) {
  const int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (b >= batch) return;
  out[b] = auto_threshold_rule(static_cast<double>(median[b]), static_cast<double>(mad[b]));
}

// Per image: median(s) - 1.4826 MAD(s) over its edge similarities (graph.sim) that are not NaN,
// +inf without such edges. [B] float64.
at::Tensor auto_thresholds(const BatchGraph& graph, const Grid& grid, int64_t batch) {
  const int64_t n = grid.pixels();
  const at::Tensor mask = edge_mask(grid, graph.sim.options()).reshape({-1});  // [dirs * n]
  const at::Tensor edges = mask.nonzero().squeeze(1);
  const int64_t per_image = edges.numel();
  if (per_image == 0) {
    return at::full({batch}, std::numeric_limits<double>::infinity(),
                    graph.sim.options().dtype(at::kDouble));
  }
  // [dirs, B, n] -> [B, dirs * n] -> the existing edges [B, E].
  const at::Tensor values = graph.sim.view({grid.directions, batch, n})
                                .permute({1, 0, 2})
                                .reshape({batch, grid.directions * n})
                                .index_select(1, edges)
                                .contiguous();
  // The lower median of each image's non-NaN values: k = (count - 1) / 2, -1 without values.
  const at::Tensor count = values.isnan().logical_not().sum(1);
  const at::Tensor middle = (count - 1).div(2, "floor").contiguous();
  const at::Tensor median = kth_smallest_rows(values, middle, -1.0, 1.0).contiguous();
  at::Tensor deviation = at::empty_like(values);
  at::Tensor out = at::empty({batch}, values.options().dtype(at::kDouble));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "region_auto_threshold", [&] {
    deviation_kernel<scalar_t><<<blocks_for(batch * per_image), kThreads, 0, stream>>>(
        values.data_ptr<scalar_t>(), batch, per_image, median.data_ptr<scalar_t>(),
        deviation.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor mad = kth_smallest_rows(deviation, middle, 0.0, 2.0).contiguous();
    threshold_rule_kernel<scalar_t><<<blocks_for(batch), kThreads, 0, stream>>>(
        median.data_ptr<scalar_t>(), mad.data_ptr<scalar_t>(), batch, out.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // +inf for an image without (non-NaN) edges.
  return out.masked_fill_(count.eq(0), std::numeric_limits<double>::infinity());
}

// ---------------------------------------------------------------------------------------------
// Union-find and labels

// ECL-CC's initialisation: each pixel's parent is its smallest earlier neighbour joined by an
// edge at or above the threshold (up-left, up, up-right, left), else itself.
template <typename acc_t>
__global__ void init_parent_kernel(const acc_t* sim, int64_t batch, Grid grid,
                                   const double* threshold, int32_t* parent) {
  const int64_t n = grid.pixels(), total = batch * n;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= total) return;
  const int64_t b = g / n, p = g % n;
  const int64_t y = p / grid.width, x = p % grid.width;
  const double thr = threshold[b];
  const auto joined = [&](int d, int64_t q) {  // edge q -> q + offset(d) == p, with q in image
    return static_cast<double>(sim[d * total + b * n + q]) >= thr;
  };
  int64_t up = g;
  if (grid.directions == 4 && y > 0 && x > 0 && joined(2, p - grid.width - 1)) {
    up = g - grid.width - 1;
  } else if (y > 0 && joined(1, p - grid.width)) {
    up = g - grid.width;
  } else if (grid.directions == 4 && y > 0 && x + 1 < grid.width && joined(3, p - grid.width + 1)) {
    up = g - grid.width + 1;
  } else if (x > 0 && joined(0, p - 1)) {
    up = g - 1;
  }
  parent[g] = static_cast<int32_t>(up);
}

// Unites every pixel with each forward neighbour joined at or above the threshold.
template <typename acc_t>
__global__ void hook_kernel(const acc_t* sim, int64_t batch, Grid grid, const double* threshold,
                            int32_t* parent) {
  const int64_t n = grid.pixels(), total = batch * n;
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= total) return;
  const int64_t b = g / n, p = g % n;
  const int64_t y = p / grid.width, x = p % grid.width;
  const double thr = threshold[b];
  for (int d = 0; d < grid.directions; ++d) {
    if (grid.has_neighbour(y, x, d) && static_cast<double>(sim[d * total + g]) >= thr) {
      unite_roots<DeviceAtomicAccess>(parent, static_cast<int32_t>(g),
                                      static_cast<int32_t>(g + grid.offset(d)));
    }
  }
}

// parent[x] = root of x for the listed elements (all of 0..count-1 when list is null).
__global__ void flatten_kernel(int32_t* parent, const int32_t* list, int64_t count,
                               uint8_t* changed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const int32_t x = list != nullptr ? list[i] : static_cast<int32_t>(i);
  const int32_t root = find_root<DeviceAtomicAccess>(parent, x);
  DeviceAtomicAccess::store(parent + x, root);
  if (changed != nullptr && root != x) changed[root] = 1;
}

__global__ void root_flag_kernel(const int32_t* parent, int64_t total, int64_t* flags) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g < total) flags[g] = root_flag(parent, static_cast<int32_t>(g));
}

// labels[g] = the image-local exclusive count of roots before g's root.
__global__ void label_kernel(const int32_t* parent, const int64_t* roots_before, int64_t total,
                             int64_t* labels) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g < total) labels[g] = compact_label(roots_before, parent[g]);
}

// Flattens every pixel to its root and writes compact raster-order labels and counts.
void write_labels(at::Tensor& parent, int64_t batch, int64_t n, at::Tensor labels, at::Tensor num) {
  const int64_t total = batch * n;
  const auto stream = at::cuda::getCurrentCUDAStream();
  flatten_kernel<<<blocks_for(total), kThreads, 0, stream>>>(parent.data_ptr<int32_t>(), nullptr,
                                                             total, nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  at::Tensor flags = at::empty({batch, n}, labels.options());
  root_flag_kernel<<<blocks_for(total), kThreads, 0, stream>>>(parent.data_ptr<int32_t>(), total,
                                                               flags.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor roots_before = (flags.cumsum(1) - flags).contiguous();
  label_kernel<<<blocks_for(total), kThreads, 0, stream>>>(parent.data_ptr<int32_t>(),
                                                           roots_before.data_ptr<int64_t>(), total,
                                                           labels.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  num.copy_(flags.sum(1));
}

// ---------------------------------------------------------------------------------------------
// Average linkage

// rows [B*n, C]: the L2-normalised pixel features (the sums of the one-pixel regions), and
// region_norm [B*n] their norms, as the CPU's PixelGraph and AverageLinkage compute them.
template <typename scalar_t, typename acc_t>
__global__ void unit_rows_kernel(const scalar_t* feat, int64_t batch, int64_t channels, int64_t n,
                                 const acc_t* norm, acc_t* rows) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= batch * n * channels) return;
  const int64_t g = e / channels, c = e % channels;
  const int64_t b = g / n, p = g % n;
  rows[e] = exact_mul(static_cast<acc_t>(feat[(b * channels + c) * n + p]), inverse_norm(norm[g]));
}

template <typename acc_t>
__global__ void unit_norm_kernel(const acc_t* pixel_norm, int64_t total, acc_t* region_norm) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g < total) region_norm[g] = unit_norm(pixel_norm[g]);
}

// The first edge list: every existing grid edge (a, b = a + offset(d), sim), a < b.
template <typename acc_t>
__global__ void grid_edges_kernel(const acc_t* sim, int64_t batch, Grid grid, int32_t* a,
                                  int32_t* b, acc_t* s) {
  const int64_t n = grid.pixels(), total = batch * n;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= grid.directions * total) return;
  const int d = static_cast<int>(e / total);
  const int64_t g = e % total, p = g % n;
  const bool exists = grid.has_neighbour(p / grid.width, p % grid.width, d);
  a[e] = exists ? static_cast<int32_t>(g) : -1;
  b[e] = exists ? static_cast<int32_t>(g + grid.offset(d)) : -1;
  s[e] = sim[e];
}

__device__ inline void offer_pick(unsigned long long* best, int32_t r, PickKey32 key) {
  atomicMax(best + r, static_cast<unsigned long long>(key.key));
}

// Step 1 (float32): best[r] = max over r's edges of pick_key(sim, neighbour).
__global__ void pick_kernel(const int32_t* a, const int32_t* b, const float* sim, int64_t edges,
                            unsigned long long* best) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= edges || sim[e] != sim[e]) return;  // NaN is never picked (no threshold admits it)
  offer_pick(best, a[e], pick_key(sim[e], b[e]));
  offer_pick(best, b[e], pick_key(sim[e], a[e]));
}

// Step 1 (float64), first half: the best similarity of each region.
__global__ void pick_sim_kernel(const int32_t* a, const int32_t* b, const double* sim,
                                int64_t edges, unsigned long long* best_sim) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= edges || sim[e] != sim[e]) return;
  const PickKey64 key = pick_key(sim[e], 0);
  atomicMax(best_sim + a[e], static_cast<unsigned long long>(key.sim_bits));
  atomicMax(best_sim + b[e], static_cast<unsigned long long>(key.sim_bits));
}

// Second half: among the neighbours at the best similarity, the smallest name.
__global__ void pick_name_kernel(const int32_t* a, const int32_t* b, const double* sim,
                                 int64_t edges, const unsigned long long* best_sim,
                                 unsigned int* best_name) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= edges || sim[e] != sim[e]) return;
  const PickKey64 for_a = pick_key(sim[e], b[e]), for_b = pick_key(sim[e], a[e]);
  if (for_a.sim_bits == best_sim[a[e]]) atomicMax(best_name + a[e], for_a.name);
  if (for_b.sim_bits == best_sim[b[e]]) atomicMax(best_name + b[e], for_b.name);
}

template <typename Key>
__device__ inline Key load_pick(const unsigned long long* best, const unsigned int* best_name,
                                int32_t r);
template <>
__device__ inline PickKey32 load_pick<PickKey32>(const unsigned long long* best,
                                                 const unsigned int*, int32_t r) {
  return PickKey32{best[r]};
}
template <>
__device__ inline PickKey64 load_pick<PickKey64>(const unsigned long long* best,
                                                 const unsigned int* best_name, int32_t r) {
  return PickKey64{best[r], best_name[r]};
}

// Step 2: every active region whose pick reaches the threshold unites with it.
template <typename Key>
__global__ void unite_picks_kernel(const int32_t* active, int64_t count,
                                   const unsigned long long* best, const unsigned int* best_name,
                                   int64_t n, const double* threshold, int32_t* parent,
                                   int32_t* merged) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const int32_t r = active[i];
  const Key key = load_pick<Key>(best, best_name, r);
  if (key.empty() || !pick_merges(key.sim(), threshold[r / n])) return;
  if (unite_roots<DeviceAtomicAccess>(parent, r, key.neighbour())) *merged = 1;
}

// Warp-wide sum of one lane value per lane by halving, in fold_lanes' order.
template <typename acc_t>
__device__ inline acc_t warp_fold(acc_t value) {
  for (int half = kLanes / 2; half > 0; half /= 2) {
    value = exact_add(value, __shfl_xor_sync(0xffffffffu, value, half));
  }
  return value;
}

// lane_dot(u, v) by one warp: lane l sums the channels c = l (mod 32) in order.
template <typename acc_t>
__device__ inline acc_t warp_lane_dot(const acc_t* u, const acc_t* v, int64_t channels) {
  const int lane = threadIdx.x % kLanes;
  acc_t partial = 0;
  for (int64_t c = lane; c < channels; c += kLanes) {
    partial = exact_add(partial, exact_mul(u[c], v[c]));
  }
  return warp_fold(partial);
}

// Step 3: for each segment start (a merged root, followed in `members` by its other members in
// ascending order), the root's row absorbs the members' rows in that order, and its norm is
// recomputed. One block of kLanes x 4 threads per root: channels across threads for the sums,
// warp 0 for the norm.
template <typename acc_t>
__global__ void absorb_kernel(const int64_t* starts, int64_t count, const int32_t* members,
                              const int32_t* member_roots, int64_t active, int64_t channels,
                              acc_t* rows, acc_t* region_norm) {
  const int64_t i = blockIdx.x;
  if (i >= count) return;
  const int64_t start = starts[i];
  const int32_t root = members[start];
  acc_t* into = rows + static_cast<int64_t>(root) * channels;
  for (int64_t c = threadIdx.x; c < channels; c += blockDim.x) {
    acc_t sum = into[c];
    for (int64_t t = start + 1; t < active && member_roots[t] == root; ++t) {
      sum = exact_add(sum, rows[static_cast<int64_t>(members[t]) * channels + c]);
    }
    into[c] = sum;
  }
  __syncthreads();
  if (threadIdx.x < kLanes) {
    const acc_t self_dot = warp_lane_dot(into, into, channels);
    if (threadIdx.x == 0) region_norm[root] = norm_of_dot(self_dot);
  }
}

// Step 4, first half: endpoints renamed to their roots; kind 0 = self-loop (dropped), 1 = kept
// with its similarity (both regions untouched), 2 = touches a merged region (recomputed).
__global__ void rename_edges_kernel(int32_t* a, int32_t* b, int64_t edges, const int32_t* parent,
                                    const uint8_t* changed, uint8_t* kind) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= edges) return;
  int32_t ra = parent[a[e]], rb = parent[b[e]];
  if (ra == rb) {
    kind[e] = 0;
    return;
  }
  if (ra > rb) {
    const int32_t t = ra;
    ra = rb;
    rb = t;
  }
  a[e] = ra;
  b[e] = rb;
  kind[e] = (changed[ra] || changed[rb]) ? 2 : 1;
}

// Second half: the cosine of each deduplicated pair (pairs [count] = a << 32 | b), one warp per
// edge.
template <typename acc_t>
__global__ void pair_similarity_kernel(const int64_t* pairs, int64_t count, const acc_t* rows,
                                       const acc_t* region_norm, int64_t channels, int32_t* a,
                                       int32_t* b, acc_t* sim) {
  const int64_t e = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kLanes;
  if (e >= count) return;  // whole warps leave together: blockDim.x is a multiple of kLanes
  const int32_t ra = static_cast<int32_t>(pairs[e] >> 32);
  const int32_t rb = static_cast<int32_t>(pairs[e] & 0xFFFFFFFF);
  const acc_t dot = warp_lane_dot(rows + static_cast<int64_t>(ra) * channels,
                                  rows + static_cast<int64_t>(rb) * channels, channels);
  if (threadIdx.x % kLanes == 0) {
    a[e] = ra;
    b[e] = rb;
    sim[e] = cosine(dot, region_norm[ra], region_norm[rb]);
  }
}

template <typename scalar_t>
void average_linkage(const at::Tensor& feat, const BatchGraph& graph, const Grid& grid,
                     const at::Tensor& thresholds, at::Tensor& parent) {
  using acc_t = at::opmath_type<scalar_t>;
  using Key = typename PickKeyOf<acc_t>::type;
  constexpr bool kPacked = std::is_same_v<Key, PickKey32>;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t batch = feat.size(0), channels = feat.size(1), n = grid.pixels();
  const int64_t total = batch * n;
  const auto options = feat.options();
  const auto acc_opts = options.dtype(c10::CppTypeToScalarType<acc_t>::value);
  const auto int_opts = options.dtype(at::kInt);

  at::Tensor rows = at::empty({total, channels}, acc_opts);
  at::Tensor region_norm = at::empty({total}, acc_opts);
  unit_rows_kernel<scalar_t, acc_t><<<blocks_for(total * channels), kThreads, 0, stream>>>(
      feat.const_data_ptr<scalar_t>(), batch, channels, n, graph.norm.data_ptr<acc_t>(),
      rows.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  unit_norm_kernel<acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
      graph.norm.data_ptr<acc_t>(), total, region_norm.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // The grid edges, then only the existing ones.
  const int64_t slots = grid.directions * total;
  at::Tensor ea = at::empty({slots}, int_opts), eb = at::empty({slots}, int_opts);
  at::Tensor es = at::empty({slots}, acc_opts);
  grid_edges_kernel<acc_t><<<blocks_for(slots), kThreads, 0, stream>>>(
      graph.sim.data_ptr<acc_t>(), batch, grid, ea.data_ptr<int32_t>(), eb.data_ptr<int32_t>(),
      es.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  {
    const at::Tensor exists = ea.ge(0);
    ea = ea.masked_select(exists);
    eb = eb.masked_select(exists);
    es = es.masked_select(exists);
  }

  at::Tensor active = at::arange(total, int_opts);
  at::Tensor best = at::empty({total}, options.dtype(at::kLong));
  at::Tensor best_name = kPacked ? at::Tensor() : at::empty({total}, int_opts);
  at::Tensor changed = at::zeros({total}, options.dtype(at::kByte));
  at::Tensor merged = at::empty({1}, int_opts);
  auto* best_ptr = reinterpret_cast<unsigned long long*>(best.data_ptr<int64_t>());
  auto* name_ptr =
      kPacked ? nullptr : reinterpret_cast<unsigned int*>(best_name.data_ptr<int32_t>());

  while (active.numel() > 0 && ea.numel() > 0) {
    const int64_t edges = ea.numel(), count = active.numel();
    // 1. picks
    best.zero_();
    if constexpr (kPacked) {
      pick_kernel<<<blocks_for(edges), kThreads, 0, stream>>>(
          ea.data_ptr<int32_t>(), eb.data_ptr<int32_t>(), es.data_ptr<float>(), edges, best_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      best_name.zero_();
      pick_sim_kernel<<<blocks_for(edges), kThreads, 0, stream>>>(
          ea.data_ptr<int32_t>(), eb.data_ptr<int32_t>(), es.data_ptr<double>(), edges, best_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      pick_name_kernel<<<blocks_for(edges), kThreads, 0, stream>>>(
          ea.data_ptr<int32_t>(), eb.data_ptr<int32_t>(), es.data_ptr<double>(), edges, best_ptr,
          name_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    // 2. unions of the picked pairs at or above the threshold
    merged.zero_();
    unite_picks_kernel<Key><<<blocks_for(count), kThreads, 0, stream>>>(
        active.data_ptr<int32_t>(), count, best_ptr, name_ptr, n, thresholds.data_ptr<double>(),
        parent.data_ptr<int32_t>(), merged.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (merged.item<int32_t>() == 0) break;
    // 3. roots, merged sums and norms
    flatten_kernel<<<blocks_for(count), kThreads, 0, stream>>>(
        parent.data_ptr<int32_t>(), active.data_ptr<int32_t>(), count, changed.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor roots_of_active = parent.index_select(0, active);
    const auto [member_roots, order] = roots_of_active.sort(/*stable=*/true, 0, false);
    const at::Tensor members = active.index_select(0, order).contiguous();
    const at::Tensor starts =
        member_roots.eq(members)
            .logical_and(changed.index_select(0, members.to(at::kLong)).to(at::kBool))
            .nonzero()
            .squeeze(1)
            .contiguous();
    if (starts.numel() > 0) {
      absorb_kernel<acc_t><<<static_cast<unsigned>(starts.numel()), 4 * kLanes, 0, stream>>>(
          starts.data_ptr<int64_t>(), starts.numel(), members.data_ptr<int32_t>(),
          member_roots.contiguous().data_ptr<int32_t>(), count, channels, rows.data_ptr<acc_t>(),
          region_norm.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    active = active.masked_select(roots_of_active.eq(active));
    // 4. edges renamed; untouched kept, touched deduplicated and recomputed
    at::Tensor kind = at::empty({edges}, options.dtype(at::kByte));
    rename_edges_kernel<<<blocks_for(edges), kThreads, 0, stream>>>(
        ea.data_ptr<int32_t>(), eb.data_ptr<int32_t>(), edges, parent.data_ptr<int32_t>(),
        changed.data_ptr<uint8_t>(), kind.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor keep = kind.eq(1), touched = kind.eq(2);
    const at::Tensor pairs =
        std::get<0>(at::_unique(ea.masked_select(touched).to(at::kLong).bitwise_left_shift(32) +
                                    eb.masked_select(touched).to(at::kLong),
                                /*sorted=*/true))
            .contiguous();
    const int64_t fresh = pairs.numel();
    at::Tensor fa = at::empty({fresh}, int_opts), fb = at::empty({fresh}, int_opts);
    at::Tensor fs = at::empty({fresh}, acc_opts);
    if (fresh > 0) {
      pair_similarity_kernel<acc_t><<<blocks_for(fresh * kLanes), kThreads, 0, stream>>>(
          pairs.data_ptr<int64_t>(), fresh, rows.data_ptr<acc_t>(), region_norm.data_ptr<acc_t>(),
          channels, fa.data_ptr<int32_t>(), fb.data_ptr<int32_t>(), fs.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    ea = at::cat({ea.masked_select(keep), fa});
    eb = at::cat({eb.masked_select(keep), fb});
    es = at::cat({es.masked_select(keep), fs});
    changed.zero_();
  }
}

// Bytes of average linkage's region rows [images * H*W, C] held at once: larger batches run in
// groups of images (single linkage needs a few numbers per pixel and runs whole).
constexpr int64_t kRowBudgetBytes = int64_t{4} << 30;

// Merges the images of feat (contiguous, all on one device) into labels and num.
void merge_images(const at::Tensor& feat, const at::Tensor& given_thresholds, const Grid& grid,
                  bool average, at::Tensor labels, at::Tensor num) {
  const int64_t batch = feat.size(0), n = grid.pixels(), total = batch * n;
  const BatchGraph graph = batch_graph(feat, grid);
  const at::Tensor thresholds = given_thresholds.defined()
                                    ? given_thresholds
                                    : auto_thresholds(graph, grid, batch).contiguous();
  at::Tensor parent = at::empty({total}, feat.options().dtype(at::kInt));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, feat.scalar_type(), "region_merge", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (average) {
          // Every pixel starts as its own region.
          parent.copy_(at::arange(total, parent.options()));
          average_linkage<scalar_t>(feat, graph, grid, thresholds, parent);
          return;
        }
        init_parent_kernel<acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            graph.sim.data_ptr<acc_t>(), batch, grid, thresholds.data_ptr<double>(),
            parent.data_ptr<int32_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        hook_kernel<acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
            graph.sim.data_ptr<acc_t>(), batch, grid, thresholds.data_ptr<double>(),
            parent.data_ptr<int32_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
  write_labels(parent, batch, n, labels, num);
}

// The CUDA side of region_drivers.h.
struct CudaRegionMerge {
  static void merge(const at::Tensor& feat, const at::Tensor& thresholds, const Grid& grid,
                    bool average, at::Tensor& labels, at::Tensor& num) {
    const c10::cuda::CUDAGuard device_guard(feat.device());
    const int64_t batch = feat.size(0), n = grid.pixels();
    const int64_t row_bytes =
        n * feat.size(1) *
        static_cast<int64_t>(c10::elementSize(accumulation_type(feat.scalar_type())));
    const int64_t group =
        average ? std::max<int64_t>(1, kRowBudgetBytes / std::max<int64_t>(row_bytes, 1)) : batch;
    TORCH_CHECK(std::min(group, batch) * n < std::numeric_limits<int32_t>::max(), "region_merge",
                ": on CUDA at most 2^31 - 1 pixels are merged together, got B x H x W = ", batch,
                " x ", grid.height, " x ", grid.width);
    for (int64_t b0 = 0; b0 < batch; b0 += group) {
      const int64_t images = std::min(group, batch - b0);
      merge_images(feat.narrow(0, b0, images),
                   thresholds.defined() ? thresholds.narrow(0, b0, images) : at::Tensor(), grid,
                   average, labels.narrow(0, b0, images), num.narrow(0, b0, images));
    }
  }

  static at::Tensor auto_threshold(const at::Tensor& feat, const Grid& grid) {
    const c10::cuda::CUDAGuard device_guard(feat.device());
    return auto_thresholds(batch_graph(feat, grid), grid, feat.size(0));
  }
};

std::tuple<at::Tensor, at::Tensor> region_merge_cuda(const at::Tensor& feat,
                                                     const std::optional<at::Tensor>& threshold,
                                                     int64_t connectivity,
                                                     c10::string_view linkage) {
  return region_merge_driver<CudaRegionMerge>(feat, threshold, connectivity, linkage);
}

at::Tensor region_auto_threshold_cuda(const at::Tensor& feat, int64_t connectivity) {
  return region_auto_threshold_driver<CudaRegionMerge>(feat, connectivity);
}

}  // namespace

TORCH_LIBRARY_IMPL(mgccl, CUDA, m) {
  m.impl("region_merge", &region_merge_cuda);
  m.impl("region_auto_threshold", &region_auto_threshold_cuda);
}

}  // namespace mgccl
