// CPU kernels of region merging (DESIGN.md op 5): region_merge and region_auto_threshold.
//
// Images run in parallel (at::parallel_for over the batch), each on one thread: its grid edge
// similarities (pixel_graph.h), its threshold, then single linkage (a union-find over the
// edges at or above the threshold) or average linkage (average_linkage.h), and finally the
// compact raster-order labels from the union-find. Similarities are float32 (float64 for
// float64 features); thresholds are compared in float64.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/safe_numerics.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "auto_threshold_rule.h"
#include "average_linkage.h"
#include "checks.h"
#include "order_statistic.h"
#include "pixel_graph.h"
#include "union_find.h"

namespace mgccl {
namespace {

Grid check_feat(const char* op, const at::Tensor& feat, int64_t connectivity) {
  check_dim(op, "feat", feat, 4);
  TORCH_CHECK(at::isFloatingType(feat.scalar_type()), op,
              ": feat should be a floating tensor, got ", feat.scalar_type());
  TORCH_CHECK(connectivity == 4 || connectivity == 8, op, ": connectivity should be 4 or 8, got ",
              connectivity);
  const int64_t height = feat.size(2), width = feat.size(3);
  int64_t pixels = 0;
  TORCH_CHECK(
      !c10::mul_overflows(height, width, &pixels) && pixels < std::numeric_limits<int32_t>::max(),
      op, ": images of at most 2^31 - 2 pixels are supported, got H x W = ", height, " x ", width);
  checked_numel(op, "feat", {feat.size(0), feat.size(1), pixels});
  return Grid{height, width, connectivity == 4 ? 2 : 4};
}

// The automatic threshold of one image from its edge similarities; +inf without edges.
// Medians (the lower one of an even count) and deviations are taken in the similarities' own
// dtype, as the reference does. NaN similarities (edges touching a non-finite feature) are left
// out: they never merge, and the statistics describe the image's other edges.
template <typename acc_t>
double auto_threshold(const PixelGraph<acc_t>& graph) {
  std::vector<acc_t> values;
  values.reserve(graph.grid.directions * graph.grid.pixels());
  graph.for_each_edge([&values](int32_t, int32_t, acc_t s) {
    if (!std::isnan(s)) values.push_back(s);
  });
  if (values.empty()) return std::numeric_limits<double>::infinity();
  const size_t middle = (values.size() - 1) / 2;
  const acc_t median = kth_smallest(values, middle, acc_t(-1), acc_t(1));
  for (acc_t& s : values) s = std::abs(s - median);
  const acc_t mad = kth_smallest(values, middle, acc_t(0), acc_t(2));
  return static_cast<double>(median) - kAutoMadFactor * kMadToSigma * static_cast<double>(mad);
}

// Merges one image feat [channels, H*W] into labels [H*W]; returns the number of regions.
// threshold: the image's threshold, or nullptr for its automatic one.
template <typename scalar_t>
int64_t merge_image(const scalar_t* feat, int64_t channels, const Grid& grid,
                    const double* threshold, bool average, int64_t* labels) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> rows(average ? grid.pixels() * channels : 0);
  const PixelGraph<acc_t> graph(feat, channels, grid, average ? rows.data() : nullptr);
  const double thr = threshold != nullptr ? *threshold : auto_threshold(graph);
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

// The per-image thresholds as float64 on the CPU, after checking them.
at::Tensor check_threshold(const at::Tensor& threshold, const at::Tensor& feat) {
  constexpr const char* op = "region_merge";
  check_dim(op, "threshold", threshold, 1);
  check_size(op, "threshold", threshold, 0, feat.size(0), "feat.shape[0] (B)");
  TORCH_CHECK(at::isFloatingType(threshold.scalar_type()), op,
              ": threshold should be a floating tensor, got ", threshold.scalar_type());
  check_same_device(op, "threshold", threshold, "feat", feat);
  const at::Tensor values = threshold.to(at::kDouble).contiguous();
  const at::Tensor nan = values.isnan();
  TORCH_CHECK(!nan.any().item<bool>(), op, ": threshold should not be NaN, got NaN for image ",
              nan.nonzero()[0][0].item<int64_t>());
  return values;
}

std::tuple<at::Tensor, at::Tensor> region_merge_cpu(const at::Tensor& feat_in,
                                                    const std::optional<at::Tensor>& threshold,
                                                    int64_t connectivity,
                                                    c10::string_view linkage) {
  constexpr const char* op = "region_merge";
  const Grid grid = check_feat(op, feat_in, connectivity);
  TORCH_CHECK(linkage == "single" || linkage == "average", op,
              ": linkage should be 'single' or 'average', got '", std::string(linkage), "'");
  const bool average = linkage == "average";
  const at::Tensor thresholds =
      threshold.has_value() ? check_threshold(*threshold, feat_in) : at::Tensor();
  const at::Tensor feat = feat_in.contiguous();
  const int64_t batch = feat.size(0), channels = feat.size(1), n = grid.pixels();
  at::Tensor labels = at::empty({batch, grid.height, grid.width}, feat.options().dtype(at::kLong));
  at::Tensor num = at::zeros({batch}, feat.options().dtype(at::kLong));
  if (batch == 0 || n == 0) return {labels, num};
  const double* thr = threshold.has_value() ? thresholds.data_ptr<double>() : nullptr;
  int64_t* label_data = labels.data_ptr<int64_t>();
  int64_t* num_data = num.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), op, [&] {
    const scalar_t* data = feat.const_data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        num_data[b] = merge_image(data + b * channels * n, channels, grid,
                                  thr != nullptr ? thr + b : nullptr, average, label_data + b * n);
      }
    });
  });
  return {labels, num};
}

at::Tensor region_auto_threshold_cpu(const at::Tensor& feat_in, int64_t connectivity) {
  constexpr const char* op = "region_auto_threshold";
  const Grid grid = check_feat(op, feat_in, connectivity);
  const at::Tensor feat = feat_in.contiguous();
  const int64_t batch = feat.size(0), channels = feat.size(1), n = grid.pixels();
  // An image without neighbouring pixel pairs (H x W of 1 x 1, or empty) has threshold +inf.
  at::Tensor out =
      at::full({batch}, std::numeric_limits<double>::infinity(), feat.options().dtype(at::kDouble));
  if (batch == 0 || n == 0) return out;
  double* out_data = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feat.scalar_type(), op, [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* data = feat.const_data_ptr<scalar_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        out_data[b] = auto_threshold(PixelGraph<acc_t>(data + b * channels * n, channels, grid));
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mgccl, CPU, m) {
  m.impl("region_merge", &region_merge_cpu);
  m.impl("region_auto_threshold", &region_auto_threshold_cpu);
}

}  // namespace mgccl
