// The 4- or 8-neighbour grid graph of one image, with the cosine similarity of every edge.
//
// Features arrive channel-first ([C, H*W] for one image), so the similarities are accumulated
// a few channels at a time over a chunk of pixels: every inner loop runs over contiguous pixels
// and vectorises, and the features are read once. The per-pixel arithmetic (the order of the
// channel sums, the norm, the cosine) is common/pixel_graph.h's, which the GPU runs per pixel.
// Average linkage also gets the normalised features as rows [H*W, C] (one region per pixel to start
// from) from the same pass.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/pixel_graph.h"

namespace mgccl {

template <typename acc_t>
struct PixelGraph {
  static constexpr int64_t kChunkPixels = 2048;

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
      for (int64_t p = p0; p < p1; ++p) norm[p] = exact_sqrt(norm[p]);
      if (rows != nullptr) {
        for (int64_t p = p0; p < p1; ++p) {
          const acc_t inverse = inverse_norm(norm[p]);
          for (int64_t c = 0; c < channels; ++c) {
            rows[p * channels + c] = exact_mul(rows[p * channels + c], inverse);
          }
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

  // out[p] += sum_k planes[k * n + p] * planes[k * n + p + off] for p in [p0, p1), in the order
  // of group_products. The pointers never alias, which lets the compiler vectorise over p
  // without runtime checks.
  template <int K, typename scalar_t>
  static void add_products(const scalar_t* __restrict planes, int64_t n, int64_t off, int64_t p0,
                           int64_t p1, acc_t* __restrict out) {
    for (int64_t p = p0; p < p1; ++p) {
      out[p] = exact_add(out[p], group_products<K, acc_t>(planes, n, p, off));
    }
  }
};

}  // namespace mgccl
