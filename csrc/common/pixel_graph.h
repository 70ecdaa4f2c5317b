// The per-pixel arithmetic of the grid graph of one image: neighbour offsets, the order in which
// the squared norms and neighbour dot products accumulate over the channels, the normalisation
// and the cosine. The CPU (csrc/cpu/pixel_graph.h, vectorised over a chunk of pixels) and the
// GPU (one thread per pixel) call the same functions, so every edge similarity, and every
// threshold decision, is bitwise the same on both.
#pragma once

#include <cstdint>

#include "host_device.h"

namespace mgccl {

// The neighbours that follow a pixel in raster order, so that every edge is listed once:
// right, down, down-right, down-left. 4-connectivity uses the first two, 8 all four.
struct Grid {
  int64_t height;
  int64_t width;
  int directions;  // 2 (4-connectivity) or 4 (8-connectivity)

  MGCCL_HOST_DEVICE int64_t pixels() const { return height * width; }

  MGCCL_HOST_DEVICE int64_t offset(int d) const {
    switch (d) {
      case 0:
        return 1;
      case 1:
        return width;
      case 2:
        return width + 1;
      default:
        return width - 1;
    }
  }

  MGCCL_HOST_DEVICE bool has_neighbour(int64_t y, int64_t x, int d) const {
    const bool below = y + 1 < height;
    switch (d) {
      case 0:
        return x + 1 < width;
      case 1:
        return below;
      case 2:
        return below && x + 1 < width;
      default:
        return below && x > 0;
    }
  }
};

// Channels are summed kChannelGroup at a time: a group's products are added up from 0 in
// channel order, then the group total joins the running sum; the channels left over after the
// last whole group join one by one. This is the order of both devices.
constexpr int kChannelGroup = 8;

// Pixels are normalised as x / max(|x|, eps), like torch.nn.functional.normalize.
constexpr double kNormEps = 1e-12;

// sum_k planes[k * n + p] * planes[k * n + p + off] over k < K, from 0 in order of k.
template <int K, typename acc_t, typename scalar_t>
MGCCL_HOST_DEVICE inline acc_t group_products(const scalar_t* planes, int64_t n, int64_t p,
                                              int64_t off) {
  acc_t total = 0;
  for (int k = 0; k < K; ++k) {
    total = exact_add(total, exact_mul(static_cast<acc_t>(planes[k * n + p]),
                                       static_cast<acc_t>(planes[k * n + p + off])));
  }
  return total;
}

// The whole channel sum of one pixel pair, in the order above (the GPU's loop; the CPU makes
// the same additions chunk by chunk). feat: one image [channels, n].
template <typename acc_t, typename scalar_t>
MGCCL_HOST_DEVICE inline acc_t channel_products(const scalar_t* feat, int64_t channels, int64_t n,
                                                int64_t p, int64_t off) {
  acc_t sum = 0;
  int64_t c = 0;
  for (; c + kChannelGroup <= channels; c += kChannelGroup) {
    sum = exact_add(sum, group_products<kChannelGroup, acc_t>(feat + c * n, n, p, off));
  }
  for (; c < channels; ++c) sum = exact_add(sum, group_products<1, acc_t>(feat + c * n, n, p, off));
  return sum;
}

// Cosine similarity from a dot product and two norms, clamped to [-1, 1]; 0 when a norm is 0;
// NaN when a feature is not finite (a NaN similarity never merges).
template <typename acc_t>
MGCCL_HOST_DEVICE inline acc_t cosine(acc_t dot, acc_t norm_a, acc_t norm_b) {
  const acc_t denominator = exact_mul(norm_a, norm_b);
  if (denominator == acc_t(0)) return acc_t(0);
  const acc_t c = exact_div(dot, denominator);
  if (c < acc_t(-1)) return acc_t(-1);
  if (c > acc_t(1)) return acc_t(1);
  return c;
}

// The factor that normalises a pixel of norm `norm`: 1 / max(norm, eps).
template <typename acc_t>
MGCCL_HOST_DEVICE inline acc_t inverse_norm(acc_t norm) {
  const acc_t eps = static_cast<acc_t>(kNormEps);
  return exact_div(acc_t(1), norm < eps ? eps : norm);  // std::max(norm, eps), NaN kept
}

}  // namespace mgccl
