// CPU kernels of region pooling (DESIGN.md op 5): region_pool (mean per region),
// region_broadcast (its scatter back to the pixels) and region_sum (the adjoint of
// region_broadcast, its backward).
//
// x is channel-first [B, C, H, W], so the work splits into B*C independent (image, channel)
// planes run in parallel: a plane's pixels are summed into, or read from, one row of a
// [B, C, R] buffer indexed by their labels. Sums accumulate in float32 (float64 for float64).
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "checks.h"

namespace mgccl {
namespace {

void check_x_and_labels(const char* op, const char* x_name, const at::Tensor& x,
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
void check_labels_below(const char* op, const at::Tensor& labels, const at::Tensor& limit,
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
void check_output_size(const char* op, int64_t batch, int64_t regions, int64_t channels,
                       const char* regions_name) {
  const int64_t elements = checked_numel(op, "the [B, R, C] output", {batch, regions, channels});
  const int64_t count_elements = checked_numel(op, "the [B, R] region counts", {batch, regions});
  constexpr int64_t kMaxBytes = int64_t{1} << 46;  // 64 TiB: beyond any host memory
  TORCH_CHECK(elements <= kMaxBytes / 8 && count_elements <= kMaxBytes / 8, op,
              ": the output [B, R, C] = [", batch, ", ", regions, ", ", channels,
              "] with R = ", regions_name, " is too large to allocate");
}

// Sums of x [B, C, H*W] over each label -> [B, C, regions] in the accumulation dtype.
at::Tensor region_sums(const at::Tensor& x, const at::Tensor& labels, int64_t regions) {
  const int64_t batch = x.size(0), channels = x.size(1), n = x.size(2) * x.size(3);
  at::Tensor sums =
      at::zeros({batch, channels, regions}, x.options().dtype(accumulation_type(x.scalar_type())));
  if (sums.numel() == 0 || n == 0) return sums;
  const int64_t* label_data = labels.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "region_sums", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* in = x.const_data_ptr<scalar_t>();
    acc_t* out = sums.mutable_data_ptr<acc_t>();
    at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t* lab = label_data + (plane / channels) * n;
        const scalar_t* v = in + plane * n;
        acc_t* s = out + plane * regions;
        for (int64_t p = 0; p < n; ++p) s[lab[p]] += static_cast<acc_t>(v[p]);
      }
    });
  });
  return sums;
}

// [B, C, regions] -> [B, regions, C] in dtype.
at::Tensor regions_first(const at::Tensor& per_channel, at::ScalarType dtype) {
  return per_channel.transpose(1, 2).to(dtype).contiguous();
}

std::tuple<at::Tensor, at::Tensor> region_pool_cpu(const at::Tensor& x_in,
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
  const int64_t batch = x.size(0), n = x.size(2) * x.size(3);
  const int64_t regions = batch > 0 ? num.max().item<int64_t>() : 0;
  check_output_size(op, batch, regions, x.size(1), "num.max()");
  at::Tensor counts = naming_op(op, [&] { return at::zeros({batch, regions}, labels.options()); });
  if (counts.numel() > 0) {
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    int64_t* count = counts.mutable_data_ptr<int64_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t p = 0; p < n; ++p) ++count[b * regions + lab[b * n + p]];
      }
    });
  }
  at::Tensor sums = naming_op(op, [&] { return region_sums(x, labels, regions); });
  sums.div_(counts.clamp_min(1).unsqueeze(1).to(sums.scalar_type()));
  return {regions_first(sums, x.scalar_type()), counts};
}

at::Tensor region_sum_cpu(const at::Tensor& x_in, const at::Tensor& labels_in,
                          int64_t num_regions) {
  constexpr const char* op = "region_sum";
  check_x_and_labels(op, "x", x_in, labels_in);
  TORCH_CHECK(num_regions >= 0, op, ": num_regions should be >= 0, got ", num_regions);
  check_output_size(op, x_in.size(0), num_regions, x_in.size(1), "num_regions");
  check_index_range(op, "labels", labels_in, 0, num_regions);
  const at::Tensor x = x_in.contiguous(), labels = labels_in.contiguous();
  return naming_op(
      op, [&] { return regions_first(region_sums(x, labels, num_regions), x.scalar_type()); });
}

at::Tensor region_broadcast_cpu(const at::Tensor& pooled, const at::Tensor& labels_in) {
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
  const int64_t n = labels.size(1) * labels.size(2);
  at::Tensor out = at::empty({batch, channels, labels.size(1), labels.size(2)}, pooled.options());
  if (out.numel() == 0) return out;
  const at::Tensor per_channel = pooled.transpose(1, 2).contiguous();  // [B, C, R]
  const int64_t* label_data = labels.const_data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pooled.scalar_type(), op, [&] {
    const scalar_t* in = per_channel.const_data_ptr<scalar_t>();
    scalar_t* result = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t* lab = label_data + (plane / channels) * n;
        const scalar_t* row = in + plane * regions;
        scalar_t* o = result + plane * n;
        for (int64_t p = 0; p < n; ++p) o[p] = row[lab[p]];
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mgccl, CPU, m) {
  m.impl("region_pool", &region_pool_cpu);
  m.impl("region_sum", &region_sum_cpu);
  m.impl("region_broadcast", &region_broadcast_cpu);
}

}  // namespace mgccl
