// The 4- or 8-neighbour grid graph of one image, with the cosine similarity of every edge.
//
// Features arrive channel-first ([C, H*W] for one image), so the similarities are accumulated
// a few channels at a time over a chunk of pixels: every inner loop runs over contiguous pixels
// and vectorises, and the features are read once. Average linkage also gets the normalised
// features as rows [H*W, C] (one region per pixel to start from) from the same pass.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace mgccl {

// The neighbours that follow a pixel in raster order, so that every edge is listed once:
// right, down, down-right, down-left. 4-connectivity uses the first two, 8 all four.
struct Grid {
  int64_t height;
  int64_t width;
  int directions;  // 2 (4-connectivity) or 4 (8-connectivity)

  int64_t pixels() const { return height * width; }

  int64_t offset(int d) const {
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

  bool has_neighbour(int64_t y, int64_t x, int d) const {
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

// Pixels are normalised as x / max(|x|, eps), like torch.nn.functional.normalize.
constexpr double kNormEps = 1e-12;

// Cosine similarity from a dot product and two norms, clamped to [-1, 1]; 0 when a norm is 0;
// NaN when a feature is not finite (a NaN similarity never merges).
template <typename acc_t>
inline acc_t cosine(acc_t dot, acc_t norm_a, acc_t norm_b) {
  const acc_t denominator = norm_a * norm_b;
  if (denominator == acc_t(0)) return acc_t(0);
  return std::clamp(dot / denominator, acc_t(-1), acc_t(1));
}

template <typename acc_t>
struct PixelGraph {
  static constexpr int64_t kChunkPixels = 2048;
  static constexpr int kChannelGroup = 8;

  Grid grid;
  std::vector<acc_t> norm;  // [H*W]: the L2 norm of each pixel's feature
  std::vector<acc_t> sim;   // [directions, H*W]: sim[d * H*W + p] of the edge p -> p + offset(d)

  // feat: one image's features [channels, H*W], channel-first. When `rows` is given, it
  // receives the L2-normalised features transposed to rows [H*W, channels] in the same pass.
  template <typename scalar_t>
  PixelGraph(const scalar_t* feat, int64_t channels, const Grid& grid_in, acc_t* rows = nullptr)
      : grid(grid_in),
        norm(grid_in.pixels(), acc_t(0)),
        sim(grid_in.directions * grid_in.pixels(), acc_t(0)) {
    const int64_t n = grid.pixels();
    if (n == 0) return;  // no pixels, no edges (offsets are meaningless for a width of 0)
    // A chunk of pixels at a time, kChannelGroup channels at a time: the chunk's sums (and rows)
    // stay in cache while each channel's segment of the features is read contiguously (plus a
    // row of halo for the edges that leave the chunk), and each sum is updated once per group.
    for (int64_t p0 = 0; p0 < n; p0 += kChunkPixels) {
      const int64_t p1 = std::min(n, p0 + kChunkPixels);
      int64_t c = 0;
      for (; c + kChannelGroup <= channels; c += kChannelGroup) {
        accumulate<kChannelGroup>(feat + c * n, p0, p1);
      }
      for (; c < channels; ++c) accumulate<1>(feat + c * n, p0, p1);
      if (rows != nullptr) {
        for (int64_t ch = 0; ch < channels; ++ch) {
          const scalar_t* v = feat + ch * n;
          for (int64_t p = p0; p < p1; ++p) rows[p * channels + ch] = static_cast<acc_t>(v[p]);
        }
      }
      for (int64_t p = p0; p < p1; ++p) norm[p] = std::sqrt(norm[p]);
      if (rows != nullptr) {
        for (int64_t p = p0; p < p1; ++p) {
          const acc_t inverse = acc_t(1) / std::max(norm[p], static_cast<acc_t>(kNormEps));
          for (int64_t c = 0; c < channels; ++c) rows[p * channels + c] *= inverse;
        }
      }
    }
    for (int d = 0; d < grid.directions; ++d) {
      const int64_t off = grid.offset(d);
      acc_t* out = sim.data() + d * n;
      for (int64_t p = 0; p + off < n; ++p) out[p] = cosine(out[p], norm[p], norm[p + off]);
    }
  }

  // Calls f(p, q, similarity) for every edge, p < q, in raster order of p.
  template <typename F>
  void for_each_edge(F&& f) const {
    const int64_t n = grid.pixels();
    for (int64_t y = 0; y < grid.height; ++y) {
      for (int64_t x = 0; x < grid.width; ++x) {
        const int64_t p = y * grid.width + x;
        for (int d = 0; d < grid.directions; ++d) {
          if (grid.has_neighbour(y, x, d)) {
            f(static_cast<int32_t>(p), static_cast<int32_t>(p + grid.offset(d)), sim[d * n + p]);
          }
        }
      }
    }
  }

 private:
  // Adds `K` consecutive channel planes (planes[k * H*W + p]) to the squared norms and the dot
  // products of pixels p0..p1-1: one update of each sum per K channels.
  template <int K, typename scalar_t>
  void accumulate(const scalar_t* planes, int64_t p0, int64_t p1) {
    const int64_t n = grid.pixels();
    add_products<K>(planes, n, 0, p0, p1, norm.data());
    for (int d = 0; d < grid.directions; ++d) {
      const int64_t off = grid.offset(d);
      add_products<K>(planes, n, off, p0, std::min(p1, n - off), sim.data() + d * n);
    }
  }

  // out[p] += sum_k planes[k * n + p] * planes[k * n + p + off] for p in [p0, p1). The
  // pointers never alias, which lets the compiler vectorise over p without runtime checks.
  template <int K, typename scalar_t>
  static void add_products(const scalar_t* __restrict planes, int64_t n, int64_t off, int64_t p0,
                           int64_t p1, acc_t* __restrict out) {
    for (int64_t p = p0; p < p1; ++p) {
      acc_t total = 0;
      for (int k = 0; k < K; ++k) {
        total +=
            static_cast<acc_t>(planes[k * n + p]) * static_cast<acc_t>(planes[k * n + p + off]);
      }
      out[p] += total;
    }
  }
};

}  // namespace mgccl
