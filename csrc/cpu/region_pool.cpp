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

#include "region_drivers.h"

namespace mgccl {
namespace {

struct CpuRegionPool {
  // Sums of x [B, C, H*W] over each label -> [B, C, regions] in the accumulation dtype.
  static at::Tensor region_sums(const at::Tensor& x, const at::Tensor& labels, int64_t regions) {
    const int64_t batch = x.size(0), channels = x.size(1), n = x.size(2) * x.size(3);
    at::Tensor sums = at::zeros({batch, channels, regions},
                                x.options().dtype(accumulation_type(x.scalar_type())));
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

  // Pixels per region, [B, regions] int64.
  static at::Tensor region_counts(const at::Tensor& labels, int64_t regions) {
    const int64_t batch = labels.size(0), n = labels.size(1) * labels.size(2);
    at::Tensor counts = at::zeros({batch, regions}, labels.options());
    if (counts.numel() == 0) return counts;
    const int64_t* lab = labels.const_data_ptr<int64_t>();
    int64_t* count = counts.mutable_data_ptr<int64_t>();
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        for (int64_t p = 0; p < n; ++p) ++count[b * regions + lab[b * n + p]];
      }
    });
    return counts;
  }

  // out[b, c, p] = per_channel[b, c, labels[b, p]].
  static void broadcast(const at::Tensor& per_channel, const at::Tensor& labels, at::Tensor& out) {
    const int64_t batch = per_channel.size(0), channels = per_channel.size(1);
    const int64_t regions = per_channel.size(2), n = labels.size(1) * labels.size(2);
    const int64_t* label_data = labels.const_data_ptr<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, out.scalar_type(), "region_broadcast", [&] {
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
  }
};

std::tuple<at::Tensor, at::Tensor> region_pool_cpu(const at::Tensor& x, const at::Tensor& labels,
                                                   const at::Tensor& num) {
  return region_pool_driver<CpuRegionPool>(x, labels, num);
}

at::Tensor region_sum_cpu(const at::Tensor& x, const at::Tensor& labels, int64_t num_regions) {
  return region_sum_driver<CpuRegionPool>(x, labels, num_regions);
}

at::Tensor region_broadcast_cpu(const at::Tensor& pooled, const at::Tensor& labels) {
  return region_broadcast_driver<CpuRegionPool>(pooled, labels);
}

}  // namespace

TORCH_LIBRARY_IMPL(mgccl, CPU, m) {
  m.impl("region_pool", &region_pool_cpu);
  m.impl("region_sum", &region_sum_cpu);
  m.impl("region_broadcast", &region_broadcast_cpu);
}

}  // namespace mgccl
