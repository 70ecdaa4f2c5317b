// CUDA kernels of region pooling (DESIGN.md op 5): region_pool, region_sum and
// region_broadcast, over the host drivers the CPU kernels use (region_drivers.h).
//
// Deterministic by construction, with no floating-point atomics: a sort-based segmented
// reduction. Each image's pixels are stably sorted by label (so a region's pixels stay in raster
// order) and x is read as rows [B, H*W, C]; one thread per (region, channel) sums its region's
// pixels in that order from 0, exactly the CPU's order, so the sums are bitwise the CPU's and
// the same from run to run. Pixel counts are integer scatter-adds (exact in any order).
// region_broadcast is a gather, one thread per output element.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "common/host_device.h"
#include "region_drivers.h"

namespace mgccl {
namespace {

constexpr int kThreads = 256;
// Channels per block of the segmented sum.
constexpr int kChannelBlock = 64;

// sums[b, c, r] = sum over the pixels of region r of image b, in raster order, of rows[b, p, c].
// order [B, n]: each image's pixels stably sorted by label; offsets [B, R + 1]: where each
// region's pixels start in it. Grid (B * R, ceil(C / kChannelBlock)).
template <typename scalar_t, typename acc_t>
__global__ void segmented_sum_kernel(const scalar_t* rows, const int64_t* order,
                                     const int64_t* offsets, int64_t regions, int64_t n,
                                     int64_t channels, acc_t* sums) {
  const int64_t segment = blockIdx.x;  // b * regions + r
  const int64_t b = segment / regions, r = segment % regions;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * kChannelBlock + threadIdx.x;
  if (c >= channels) return;
  const int64_t* offset = offsets + b * (regions + 1);
  const int64_t* pixels = order + b * n;
  const scalar_t* image = rows + b * n * channels;
  acc_t sum = 0;
  for (int64_t i = offset[r]; i < offset[r + 1]; ++i) {
    sum = exact_add(sum, static_cast<acc_t>(image[pixels[i] * channels + c]));
  }
  sums[(b * channels + c) * regions + r] = sum;
}

// out[b, c, p] = per_channel[b, c, labels[b, p]].
template <typename scalar_t>
__global__ void broadcast_kernel(const scalar_t* per_channel, const int64_t* labels,
                                 int64_t channels, int64_t regions, int64_t n, int64_t total,
                                 scalar_t* out) {
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= total) return;
  const int64_t p = e % n, plane = e / n, b = plane / channels;
  out[e] = per_channel[plane * regions + labels[b * n + p]];
}

// The CUDA side of region_drivers.h's pooling interface.
struct CudaRegionPool {
  static at::Tensor region_counts(const at::Tensor& labels, int64_t regions) {
    const int64_t batch = labels.size(0);
    at::Tensor counts = at::zeros({batch, regions}, labels.options());
    if (counts.numel() == 0 || labels.numel() == 0) return counts;
    return counts.scatter_add_(1, labels.reshape({batch, -1}),
                               at::ones_like(labels).reshape({batch, -1}));
  }

  static at::Tensor region_sums(const at::Tensor& x, const at::Tensor& labels, int64_t regions) {
    const c10::cuda::CUDAGuard device_guard(x.device());
    const int64_t batch = x.size(0), channels = x.size(1), n = x.size(2) * x.size(3);
    at::Tensor sums = at::zeros({batch, channels, regions},
                                x.options().dtype(accumulation_type(x.scalar_type())));
    if (sums.numel() == 0 || n == 0) return sums;
    const at::Tensor flat = labels.reshape({batch, n});
    const at::Tensor order = std::get<1>(flat.sort(/*stable=*/true, 1, false)).contiguous();
    const at::Tensor counts = region_counts(labels, regions);
    const at::Tensor offsets =
        at::cat({at::zeros({batch, 1}, counts.options()), counts.cumsum(1)}, 1).contiguous();
    const at::Tensor rows = x.reshape({batch, channels, n}).transpose(1, 2).contiguous();
    const dim3 grid(static_cast<unsigned>(batch * regions),
                    static_cast<unsigned>((channels + kChannelBlock - 1) / kChannelBlock));
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "region_sums", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      segmented_sum_kernel<scalar_t, acc_t><<<grid, kChannelBlock, 0, stream>>>(
          rows.const_data_ptr<scalar_t>(), order.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(),
          regions, n, channels, sums.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return sums;
  }

  static void broadcast(const at::Tensor& per_channel, const at::Tensor& labels, at::Tensor& out) {
    const c10::cuda::CUDAGuard device_guard(out.device());
    const int64_t channels = per_channel.size(1), regions = per_channel.size(2);
    const int64_t n = labels.size(1) * labels.size(2), total = out.numel();
    const auto stream = at::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, out.scalar_type(), "region_broadcast", [&] {
          broadcast_kernel<scalar_t>
              <<<static_cast<unsigned>((total + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
                  per_channel.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(),
                  channels, regions, n, total, out.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
  }
};

std::tuple<at::Tensor, at::Tensor> region_pool_cuda(const at::Tensor& x, const at::Tensor& labels,
                                                    const at::Tensor& num) {
  return region_pool_driver<CudaRegionPool>(x, labels, num);
}

at::Tensor region_sum_cuda(const at::Tensor& x, const at::Tensor& labels, int64_t num_regions) {
  return region_sum_driver<CudaRegionPool>(x, labels, num_regions);
}

at::Tensor region_broadcast_cuda(const at::Tensor& pooled, const at::Tensor& labels) {
  return region_broadcast_driver<CudaRegionPool>(pooled, labels);
}

}  // namespace

TORCH_LIBRARY_IMPL(mgccl, CUDA, m) {
  m.impl("region_pool", &region_pool_cuda);
  m.impl("region_sum", &region_sum_cuda);
  m.impl("region_broadcast", &region_broadcast_cuda);
}

}  // namespace mgccl
