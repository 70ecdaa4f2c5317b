// Host drivers of the region ops (DESIGN.md op 5), one per op, shared by the CPU and CUDA
// kernels: argument checks, output allocation and the arithmetic done with ATen calls, over a
// small per-device interface `Device` (csrc/cpu/region_*.cpp, csrc/cuda/regions.cu):
//
//   Device::merge(feat, thresholds, grid, average, labels, num)
//       labels [B, H, W] and num [B] of every image; thresholds [B] float64 on feat's device,
//       or undefined for the automatic ones. feat contiguous, B * H * W > 0.
//   Device::auto_threshold(feat, grid) -> [B] float64 (feat contiguous, B * H * W > 0)
//   Device::region_sums(x, labels, regions) -> [B, C, regions] sums in the accumulation dtype
//   Device::region_counts(labels, regions) -> [B, regions] int64 pixel counts
//   Device::broadcast(per_channel [B, C, R], labels, out [B, C, H, W])
#pragma once

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "checks.h"
#include "common/pixel_graph.h"

namespace mgccl {

inline Grid check_region_feat(const char* op, const at::Tensor& feat, int64_t connectivity) {
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

// The per-image thresholds as float64 on feat's device, after checking them.
inline at::Tensor check_region_threshold(const at::Tensor& threshold, const at::Tensor& feat) {
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

template <typename Device>
std::tuple<at::Tensor, at::Tensor> region_merge_driver(const at::Tensor& feat_in,
                                                       const std::optional<at::Tensor>& threshold,
                                                       int64_t connectivity,
                                                       c10::string_view linkage) {
  constexpr const char* op = "region_merge";
  const Grid grid = check_region_feat(op, feat_in, connectivity);
  TORCH_CHECK(linkage == "single" || linkage == "average", op,
              ": linkage should be 'single' or 'average', got '", std::string(linkage), "'");
  const at::Tensor thresholds =
      threshold.has_value() ? check_region_threshold(*threshold, feat_in) : at::Tensor();
  const at::Tensor feat = feat_in.contiguous();
  const int64_t batch = feat.size(0);
  at::Tensor labels = at::empty({batch, grid.height, grid.width}, feat.options().dtype(at::kLong));
  at::Tensor num = at::zeros({batch}, feat.options().dtype(at::kLong));
  if (batch == 0 || grid.pixels() == 0) return {labels, num};
  Device::merge(feat, thresholds, grid, linkage == "average", labels, num);
  return {labels, num};
}

template <typename Device>
at::Tensor region_auto_threshold_driver(const at::Tensor& feat_in, int64_t connectivity) {
  const Grid grid = check_region_feat("region_auto_threshold", feat_in, connectivity);
  const at::Tensor feat = feat_in.contiguous();
  if (feat.size(0) == 0 || grid.pixels() == 0) {
    // No edges: the threshold of an image without neighbouring pairs.
    return at::full({feat.size(0)}, std::numeric_limits<double>::infinity(),
                    feat.options().dtype(at::kDouble));
  }
  return Device::auto_threshold(feat, grid);
}

inline void check_x_and_labels(const char* op, const char* x_name, const at::Tensor& x,
                               const at::Tensor& labels) {
  check_dim(op, x_name, x, 4);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", x_name,
              " should be a floating tensor, got ", x.scalar_type());
  check_dim(op, "labels", labels, 3);
  check_index_dtype(op, "labels", labels);
  TORCH_CHECK(
      labels.size(0) == x.size(0) && labels.size(1) == x.size(2) && labels.size(2) == x.size(3), op,
      ": labels should have shape [B, H, W] = [", x.size(0), ", ", x.size(2), ", ", x.size(3),
      "] to match ", x_name, " ", shape_string(x), ", got ", shape_string(labels));
  TORCH_CHECK(labels.device() == x.device(), op, ": labels is on ", labels.device(), " but ",
              x_name, " is on ", x.device());
}

// Every image's labels lie in [0, limit[b]); limit [B] int64.
inline void check_labels_below(const char* op, const at::Tensor& labels, const at::Tensor& limit,
                               const char* what) {
  if (labels.numel() == 0) return;
  const at::Tensor flat = labels.reshape({labels.size(0), -1});
  const at::Tensor low = flat.amin(1), high = flat.amax(1);
  const at::Tensor bad = low.lt(0).logical_or(high.ge(limit));
  if (!bad.any().item<bool>()) return;
  const int64_t b = bad.nonzero()[0][0].item<int64_t>();
  TORCH_CHECK(false, op, ": labels of image ", b, " should lie in [0, ", limit[b].item<int64_t>(),
              ") (", what, "), got min ", low[b].item<int64_t>(), " and max ",
              high[b].item<int64_t>());
}

// The [B, R, C] outputs (and their [B, C, R] accumulator) must be countable in int64 and small
// enough to allocate: refused with the op's name rather than a bare allocator error.
inline void check_output_size(const char* op, int64_t batch, int64_t regions, int64_t channels,
                              const char* regions_name) {
  const int64_t elements = checked_numel(op, "the [B, R, C] output", {batch, regions, channels});
  const int64_t count_elements = checked_numel(op, "the [B, R] region counts", {batch, regions});
  constexpr int64_t kMaxBytes = int64_t{1} << 46;  // 64 TiB: beyond any host memory
  TORCH_CHECK(elements <= kMaxBytes / 8 && count_elements <= kMaxBytes / 8, op,
              ": the output [B, R, C] = [", batch, ", ", regions, ", ", channels,
              "] with R = ", regions_name, " is too large to allocate");
}

// [B, C, regions] -> [B, regions, C] in dtype.
inline at::Tensor regions_first(const at::Tensor& per_channel, at::ScalarType dtype) {
  return per_channel.transpose(1, 2).to(dtype).contiguous();
}

template <typename Device>
std::tuple<at::Tensor, at::Tensor> region_pool_driver(const at::Tensor& x_in,
                                                      const at::Tensor& labels_in,
                                                      const at::Tensor& num) {
  constexpr const char* op = "region_pool";
  check_x_and_labels(op, "x", x_in, labels_in);
  check_dim(op, "num", num, 1);
  check_index_dtype(op, "num", num);
  check_size(op, "num", num, 0, x_in.size(0), "x.shape[0] (B)");
  TORCH_CHECK(num.device() == x_in.device(), op, ": num is on ", num.device(), " but x is on ",
              x_in.device());
  check_index_range(op, "num", num, 0, std::numeric_limits<int64_t>::max());
  check_labels_below(op, labels_in, num, "num[b]");
  const at::Tensor x = x_in.contiguous(), labels = labels_in.contiguous();
  const int64_t batch = x.size(0);
  const int64_t regions = batch > 0 ? num.max().item<int64_t>() : 0;
  check_output_size(op, batch, regions, x.size(1), "num.max()");
  const at::Tensor counts = naming_op(op, [&] { return Device::region_counts(labels, regions); });
  at::Tensor sums = naming_op(op, [&] { return Device::region_sums(x, labels, regions); });
  sums.div_(counts.clamp_min(1).unsqueeze(1).to(sums.scalar_type()));
  return {regions_first(sums, x.scalar_type()), counts};
}

template <typename Device>
at::Tensor region_sum_driver(const at::Tensor& x_in, const at::Tensor& labels_in,
                             int64_t num_regions) {
  constexpr const char* op = "region_sum";
  check_x_and_labels(op, "x", x_in, labels_in);
  TORCH_CHECK(num_regions >= 0, op, ": num_regions should be >= 0, got ", num_regions);
  check_output_size(op, x_in.size(0), num_regions, x_in.size(1), "num_regions");
  check_index_range(op, "labels", labels_in, 0, num_regions);
  const at::Tensor x = x_in.contiguous(), labels = labels_in.contiguous();
  return naming_op(op, [&] {
    return regions_first(Device::region_sums(x, labels, num_regions), x.scalar_type());
  });
}

template <typename Device>
at::Tensor region_broadcast_driver(const at::Tensor& pooled, const at::Tensor& labels_in) {
  constexpr const char* op = "region_broadcast";
  check_dim(op, "pooled", pooled, 3);
  TORCH_CHECK(at::isFloatingType(pooled.scalar_type()), op,
              ": pooled should be a floating tensor, got ", pooled.scalar_type());
  check_dim(op, "labels", labels_in, 3);
  check_index_dtype(op, "labels", labels_in);
  check_size(op, "labels", labels_in, 0, pooled.size(0), "pooled.shape[0] (B)");
  TORCH_CHECK(labels_in.device() == pooled.device(), op, ": labels is on ", labels_in.device(),
              " but pooled is on ", pooled.device());
  const int64_t batch = pooled.size(0), regions = pooled.size(1), channels = pooled.size(2);
  check_index_range(op, "labels", labels_in, 0, regions);
  const at::Tensor labels = labels_in.contiguous();
  at::Tensor out = at::empty({batch, channels, labels.size(1), labels.size(2)}, pooled.options());
  if (out.numel() == 0) return out;
  Device::broadcast(pooled.transpose(1, 2).contiguous(), labels, out);
  return out;
}

}  // namespace mgccl
