// Round-based parallel average-linkage agglomeration of one image (DESIGN.md op 5).
//
// The region adjacency graph is an edge list (a, b, similarity) over region names (the raster
// index of a region's first pixel, which is also its root in MinRootUnionFind). Each round:
//   1. every region picks its most similar neighbour (ties: the smaller name), one pass over
//      the edges;
//   2. picked pairs with similarity >= threshold are united (chains merge whole);
//   3. each merged region's feature sum absorbs its members' sums (the mean over all its
//      pixels, up to the count, which cosine similarity ignores);
//   4. the edge list is updated in place of a rebuild: endpoints are renamed to their new
//      roots, self-loops dropped, and only edges touching a merged region are deduplicated and
//      get a new similarity; edges between untouched regions keep theirs.
// The pixels are visited only to build the first graph. The pick (packed keys), the region
// cosine (lane-ordered sums) and the union-find are those of csrc/common/, which the GPU kernel
// runs too, so both devices merge the same pairs in every round.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "common/linkage_pick.h"
#include "pixel_graph.h"
#include "union_find.h"

namespace mgccl {

template <typename acc_t>
class AverageLinkage {
 public:
  // rows: [H*W, channels] row-major, the pixels' L2-normalised features (the sums of the
  // one-pixel regions), as PixelGraph writes them; graph: the pixel grid with its edge
  // similarities.
  AverageLinkage(std::vector<acc_t> rows, int64_t channels, const PixelGraph<acc_t>& graph,
                 MinRootUnionFind& sets)
      : sets_(sets),
        channels_(channels),
        sums_(std::move(rows)),
        norm_(graph.grid.pixels()),
        best_(graph.grid.pixels()),
        changed_(graph.grid.pixels(), 0),
        active_(graph.grid.pixels()) {
    const int64_t n = graph.grid.pixels();
    for (int64_t p = 0; p < n; ++p) {
      norm_[p] = unit_norm(graph.norm[p]);
      active_[p] = static_cast<int32_t>(p);
    }
    edges_.reserve(graph.grid.directions * n);
    graph.for_each_edge([this](int32_t p, int32_t q, acc_t s) { edges_.push_back({p, q, s}); });
  }

  // Merges rounds until one merges nothing; the regions are then the sets of `sets`.
  void run(double threshold) {
    while (pick_and_unite(threshold)) {
      absorb_members();
      update_edges();
    }
  }

 private:
  struct Edge {
    int32_t a, b;  // region names, a < b
    acc_t sim;
  };

  const acc_t* row(int32_t r) const { return sums_.data() + static_cast<int64_t>(r) * channels_; }
  acc_t* row(int32_t r) { return sums_.data() + static_cast<int64_t>(r) * channels_; }

  using Key = typename PickKeyOf<acc_t>::type;

  acc_t row_norm(int32_t r) const { return norm_of_dot(lane_dot(row(r), row(r), channels_)); }

  acc_t similarity(int32_t a, int32_t b) const {
    return cosine(lane_dot(row(a), row(b), channels_), norm_[a], norm_[b]);
  }

  void offer(int32_t r, int32_t neighbour, acc_t s) {
    // A NaN similarity (a non-finite feature) is never picked, as no threshold admits it.
    if (s != s) return;
    const Key key = pick_key(s, neighbour);
    if (key > best_[r]) best_[r] = key;
  }

  // Steps 1 and 2; true when some pair merged.
  bool pick_and_unite(double threshold) {
    for (const int32_t r : active_) best_[r] = Key{};
    for (const Edge& e : edges_) {
      offer(e.a, e.b, e.sim);
      offer(e.b, e.a, e.sim);
    }
    bool merged = false;
    for (const int32_t r : active_) {
      if (!best_[r].empty() && pick_merges(best_[r].sim(), threshold)) {
        merged |= sets_.unite(r, best_[r].neighbour());
      }
    }
    return merged;
  }

  // Step 3: members add their sums to their root and leave the active list.
  void absorb_members() {
    std::vector<int32_t> roots;
    roots.reserve(active_.size());
    for (const int32_t r : active_) {
      const int32_t root = sets_.find(r);
      if (root == r) {
        roots.push_back(r);
        continue;
      }
      changed_[root] = 1;
      acc_t* into = row(root);
      const acc_t* from = row(r);
      for (int64_t c = 0; c < channels_; ++c) into[c] = exact_add(into[c], from[c]);
    }
    for (const int32_t r : roots) {
      if (changed_[r]) norm_[r] = row_norm(r);
    }
    active_.swap(roots);
  }

  // Step 4.
  void update_edges() {
    kept_.clear();
    renamed_.clear();
    for (const Edge& e : edges_) {
      int32_t a = sets_.find(e.a);
      int32_t b = sets_.find(e.b);
      if (a == b) continue;
      if (!changed_[a] && !changed_[b]) {
        kept_.push_back(e);  // both regions untouched: same names, same similarity
        continue;
      }
      if (a > b) std::swap(a, b);
      renamed_.push_back({a, b, acc_t(0)});
    }
    const auto by_names = [](const Edge& x, const Edge& y) {
      return x.a != y.a ? x.a < y.a : x.b < y.b;
    };
    const auto same_names = [](const Edge& x, const Edge& y) { return x.a == y.a && x.b == y.b; };
    std::sort(renamed_.begin(), renamed_.end(), by_names);
    renamed_.erase(std::unique(renamed_.begin(), renamed_.end(), same_names), renamed_.end());
    for (Edge& e : renamed_) e.sim = similarity(e.a, e.b);
    kept_.insert(kept_.end(), renamed_.begin(), renamed_.end());
    edges_.swap(kept_);
    for (const int32_t r : active_) changed_[r] = 0;
  }

  MinRootUnionFind& sets_;
  const int64_t channels_;
  std::vector<acc_t> sums_;       // [H*W, channels]: row r is the feature sum of region r
  std::vector<acc_t> norm_;       // [H*W]: |sums_ row r|
  std::vector<Key> best_;         // [H*W]: region r's pick this round (empty: no neighbour)
  std::vector<uint8_t> changed_;  // [H*W]: 1 for a region that absorbed others this round
  std::vector<int32_t> active_;   // names of the current regions
  std::vector<Edge> edges_, kept_, renamed_;
};

}  // namespace mgccl
