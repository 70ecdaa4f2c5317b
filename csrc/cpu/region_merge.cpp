// CPU kernels of region merging (DESIGN.md op 5): region_merge and region_auto_threshold.
//
// Images run in parallel (at::parallel_for over the batch), each on one thread: its grid edge
// similarities (pixel_graph.h), its threshold, then single linkage (a union-find over the
// edges at or above the threshold) or average linkage (average_linkage.h), and finally the
// compact raster-order labels from the union-find. Similarities are float32 (float64 for
// float64 features); thresholds are compared in float64. Checks and outputs are the shared
// driver's (region_drivers.h), the per-element arithmetic csrc/common/'s.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "average_linkage.h"
#include "order_statistic.h"
#include "pixel_graph.h"
#include "region_drivers.h"
#include "union_find.h"

namespace mgccl {
namespace {

// The automatic threshold of one image from its edge similarities; +inf without edges.
// Medians (the lower one of an even count) and deviations are taken in the similarities' own
// dtype, as the reference does. NaN similarities (edges touching a non-finite feature) are left
// out: they never merge, and the statistics describe the image's other edges.
template <typename acc_t>
double image_auto_threshold(const PixelGraph<acc_t>& graph) {
  std::vector<acc_t> values;
  values.reserve(graph.grid.directions * graph.grid.pixels());
  graph.for_each_edge([&values](int32_t, int32_t, acc_t s) {
    if (!std::isnan(s)) values.push_back(s);
  });
  if (values.empty()) return std::numeric_limits<double>::infinity();
  const size_t middle = (values.size() - 1) / 2;
  const acc_t median = kth_smallest(values, middle, acc_t(-1), acc_t(1));
  for (acc_t& s : values) s = std::abs(exact_add(s, -median));
  const acc_t mad = kth_smallest(values, middle, acc_t(0), acc_t(2));
  return auto_threshold_rule(static_cast<double>(median), static_cast<double>(mad));
}

// Merges one image feat [channels, H*W] into labels [H*W]; returns the number of regions.
// threshold: the image's threshold, or nullptr for its automatic one.
template <typename scalar_t>
int64_t merge_image(const scalar_t* feat, int64_t channels, const Grid& grid,
                    const double* threshold, bool average, int64_t* labels) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> rows(average ? grid.pixels() * channels : 0);
  const PixelGraph<acc_t> graph(feat, channels, grid, average ? rows.data() : nullptr);
  const double thr = threshold != nullptr ? *threshold : image_auto_threshold(graph);
  MinRootUnionFind sets(grid.pixels());
  if (average) {
    AverageLinkage<acc_t>(std::move(rows), channels, graph, sets).run(thr);
  } else {
    graph.for_each_edge([&](int32_t p, int32_t q, acc_t s) {
      if (static_cast<double>(s) >= thr) sets.unite(p, q);
    });
  }
  return sets.compact_labels(labels);
}

// The CPU side of region_drivers.h: images in parallel, one thread each.
struct CpuRegionMerge {
  static void merge(const at::Tensor& feat, const at::Tensor& thresholds, const Grid& grid,
                    bool average, at::Tensor& labels, at::Tensor& num) {
    const int64_t batch = feat.size(0), channels = feat.size(1), n = grid.pixels();
    const double* thr = thresholds.defined() ? thresholds.data_ptr<double>() : nullptr;
    int64_t* label_data = labels.data_ptr<int64_t>();
    int64_t* num_data = num.data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, feat.scalar_type(), "region_merge", [&] {
          const scalar_t* data = feat.const_data_ptr<scalar_t>();
          at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
            for (int64_t b = begin; b < end; ++b) {
              num_data[b] =
                  merge_image(data + b * channels * n, channels, grid,
                              thr != nullptr ? thr + b : nullptr, average, label_data + b * n);
            }
          });
        });
  }

  static at::Tensor auto_threshold(const at::Tensor& feat, const Grid& grid) {
    const int64_t batch = feat.size(0), channels = feat.size(1), n = grid.pixels();
    at::Tensor out = at::empty({batch}, feat.options().dtype(at::kDouble));
    double* out_data = out.data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, feat.scalar_type(), "region_auto_threshold", [&] {
          using acc_t = at::opmath_type<scalar_t>;
          const scalar_t* data = feat.const_data_ptr<scalar_t>();
          at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
            for (int64_t b = begin; b < end; ++b) {
              out_data[b] =
                  image_auto_threshold(PixelGraph<acc_t>(data + b * channels * n, channels, grid));
            }
          });
        });
    return out;
  }
};

std::tuple<at::Tensor, at::Tensor> region_merge_cpu(const at::Tensor& feat,
                                                    const std::optional<at::Tensor>& threshold,
                                                    int64_t connectivity,
                                                    c10::string_view linkage) {
  return region_merge_driver<CpuRegionMerge>(feat, threshold, connectivity, linkage);
}

at::Tensor region_auto_threshold_cpu(const at::Tensor& feat, int64_t connectivity) {
  return region_auto_threshold_driver<CpuRegionMerge>(feat, connectivity);
}

}  // namespace

TORCH_LIBRARY_IMPL(mgccl, CPU, m) {
  m.impl("region_merge", &region_merge_cpu);
  m.impl("region_auto_threshold", &region_auto_threshold_cpu);
}

}  // namespace mgccl
