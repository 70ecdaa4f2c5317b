// Race test of the shared region-merging bodies (csrc/common/) on real host threads.
//
// The GPU kernels run union-find hooking (unite_roots with atomicCAS), path-halving finds and the
// packed average-linkage pick (atomicMax of pick_key) from thousands of threads at once. This
// program runs the same functions through std::atomic_ref on 2..16 std::threads, with random
// work splits and random yields between the memory operations (so the interleavings vary from
// run to run), and checks every result against a sequential run:
//   1. connected components: unite_roots over random graphs (grid edges plus random long edges,
//      duplicates and self-loops), then find_root of every node equals the sequential root (the
//      smallest member: canonical, so equality is exact), and the compact labels agree;
//   2. the pick: every node's best neighbour by packed keys (float32: one fetch-max; float64: best
//      similarity then smallest name, the GPU's two passes) equals the rule written out directly
//      (largest similarity, ties to the smaller name, NaN never preferred), with many ties;
//   3. one average-linkage round: the picked pairs at or above a threshold united concurrently
//      give the sequential partition.
// Built and run by python_tests/test_union_find_threads.py and, under ThreadSanitizer, by .ci/run.
// Usage: union_find_race_test [seeds=40] [max_threads=16] [nodes=3000]; exit 0 when all agree.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <thread>
#include <vector>

#include "common/compaction.h"
#include "common/linkage_pick.h"
#include "common/union_find.h"

namespace {

using mgccl::HostAtomicAccess;

// HostAtomicAccess that sometimes yields before an access, to shuffle the interleavings.
thread_local std::minstd_rand yield_rng{1};
struct YieldingAccess {
  static void maybe_yield() {
    if (yield_rng() % 8 == 0) std::this_thread::yield();
  }
  static int32_t load(const int32_t* slot) {
    maybe_yield();
    return HostAtomicAccess::load(slot);
  }
  static void store(int32_t* slot, int32_t value) {
    maybe_yield();
    HostAtomicAccess::store(slot, value);
  }
  static bool cas(int32_t* slot, int32_t expected, int32_t desired) {
    maybe_yield();
    return HostAtomicAccess::cas(slot, expected, desired);
  }
};

struct Edge {
  int32_t a, b;
  float sim;
};

int failures = 0;
void check(bool ok, const char* what, uint32_t seed, int threads) {
  if (ok) return;
  ++failures;
  std::fprintf(stderr, "MISMATCH: %s (seed %u, %d threads)\n", what, seed, threads);
}

// Runs body(thread, item) for items 0..count-1 split over `threads` std::threads in random
// contiguous shares, each thread seeding its own yield generator.
template <typename Body>
void run_threads(int threads, int64_t count, std::mt19937& rng, Body body) {
  std::vector<int64_t> cuts{0, count};
  for (int t = 1; t < threads; ++t) cuts.push_back(static_cast<int64_t>(rng() % (count + 1)));
  std::sort(cuts.begin(), cuts.end());
  std::vector<std::thread> pool;
  std::atomic<int> ready{0};
  for (int t = 0; t < threads; ++t) {
    const uint32_t seed = rng();
    pool.emplace_back([&, t, seed] {
      yield_rng.seed(seed);
      ready.fetch_add(1);
      while (ready.load() < threads) std::this_thread::yield();  // start together
      for (int64_t i = cuts[t]; i < cuts[t + 1]; ++i) body(i);
    });
  }
  for (std::thread& th : pool) th.join();
}

std::vector<Edge> random_graph(int32_t nodes, std::mt19937& rng) {
  const int32_t width = 1 + static_cast<int32_t>(rng() % 64);
  std::vector<Edge> edges;
  std::uniform_int_distribution<int32_t> node(0, nodes - 1);
  // Similarities from a small set: many exact ties.
  const float levels[] = {-1.0f, -0.0f, 0.0f, 0.25f, 0.5f, 0.5f, 0.75f, 1.0f, NAN};
  const auto level = [&] { return levels[rng() % 9]; };
  for (int32_t p = 0; p < nodes; ++p) {
    if ((p + 1) % width != 0 && p + 1 < nodes && rng() % 3 != 0)
      edges.push_back({p, p + 1, level()});
    if (p + width < nodes && rng() % 3 != 0) edges.push_back({p, p + width, level()});
  }
  const int32_t extra = nodes / 8;
  for (int32_t i = 0; i < extra; ++i) {
    int32_t a = node(rng), b = node(rng);
    if (a > b) std::swap(a, b);
    edges.push_back({a, b, level()});  // self-loops (a == b) and duplicates included
  }
  std::shuffle(edges.begin(), edges.end(), rng);
  return edges;
}

std::vector<int32_t> sequential_roots(int32_t nodes,
                                      const std::vector<std::pair<int32_t, int32_t>>& pairs) {
  std::vector<int32_t> parent(nodes);
  for (int32_t i = 0; i < nodes; ++i) parent[i] = i;
  for (const auto& [a, b] : pairs) mgccl::unite_roots<mgccl::PlainAccess>(parent.data(), a, b);
  for (int32_t i = 0; i < nodes; ++i)
    parent[i] = mgccl::find_root<mgccl::PlainAccess>(parent.data(), i);
  return parent;
}

// Compact labels by the exclusive scan of root flags (common/compaction.h), as the GPU does.
std::vector<int64_t> scan_labels(const std::vector<int32_t>& roots) {
  std::vector<int64_t> before(roots.size());
  int64_t count = 0;
  for (size_t i = 0; i < roots.size(); ++i) {
    before[i] = count;
    count += mgccl::root_flag(roots.data(), static_cast<int32_t>(i));
  }
  std::vector<int64_t> labels(roots.size());
  for (size_t i = 0; i < roots.size(); ++i)
    labels[i] = mgccl::compact_label(before.data(), roots[i]);
  return labels;
}

void test_components(int32_t nodes, int threads, uint32_t seed) {
  std::mt19937 rng(seed);
  const std::vector<Edge> edges = random_graph(nodes, rng);
  std::vector<std::pair<int32_t, int32_t>> pairs;
  for (const Edge& e : edges) pairs.emplace_back(e.a, e.b);
  const std::vector<int32_t> expected = sequential_roots(nodes, pairs);

  std::vector<int32_t> parent(nodes);
  for (int32_t i = 0; i < nodes; ++i) parent[i] = i;
  run_threads(threads, static_cast<int64_t>(pairs.size()), rng, [&](int64_t i) {
    mgccl::unite_roots<YieldingAccess>(parent.data(), pairs[i].first, pairs[i].second);
  });
  // Concurrent flattening, as the GPU's flatten kernel.
  run_threads(threads, nodes, rng, [&](int64_t i) {
    const int32_t x = static_cast<int32_t>(i);
    YieldingAccess::store(parent.data() + x, mgccl::find_root<YieldingAccess>(parent.data(), x));
  });
  check(parent == expected, "union-find roots", seed, threads);

  // Compact labels: the fused sequential pass (CPU) against the scan (GPU).
  std::vector<int64_t> fused(nodes);
  int64_t num = 0;
  for (int32_t p = 0; p < nodes; ++p) fused[p] = expected[p] == p ? num++ : fused[expected[p]];
  check(scan_labels(parent) == fused, "compact labels", seed, threads);
}

// The pick rule written out: larger similarity, ties to the smaller name; NaN only when nothing
// else was offered (it never merges).
bool better(float s, int32_t name, float best_s, int32_t best_name) {
  if (best_name < 0) return true;
  if (std::isnan(best_s)) return !std::isnan(s) || name < best_name;
  if (std::isnan(s)) return false;
  return s > best_s || (s == best_s && name < best_name);
}

void atomic_max(uint64_t* slot, uint64_t value) {
  std::atomic_ref<uint64_t> ref(*slot);
  uint64_t current = ref.load(std::memory_order_relaxed);
  while (current < value && !ref.compare_exchange_weak(current, value, std::memory_order_relaxed)) {
    YieldingAccess::maybe_yield();
  }
}
void atomic_max(uint32_t* slot, uint32_t value) {
  std::atomic_ref<uint32_t> ref(*slot);
  uint32_t current = ref.load(std::memory_order_relaxed);
  while (current < value && !ref.compare_exchange_weak(current, value, std::memory_order_relaxed)) {
    YieldingAccess::maybe_yield();
  }
}

void test_pick_and_round(int32_t nodes, int threads, uint32_t seed) {
  std::mt19937 rng(seed ^ 0x9e3779b9u);
  const std::vector<Edge> edges = random_graph(nodes, rng);
  std::vector<int32_t> best_name(nodes, -1);
  std::vector<float> best_sim(nodes, 0.0f);
  for (const Edge& e : edges) {
    if (e.a == e.b) continue;  // region graphs have no self-loops
    if (better(e.sim, e.b, best_sim[e.a], best_name[e.a]))
      best_sim[e.a] = e.sim, best_name[e.a] = e.b;
    if (better(e.sim, e.a, best_sim[e.b], best_name[e.b]))
      best_sim[e.b] = e.sim, best_name[e.b] = e.a;
  }

  // float32: one packed fetch-max per endpoint.
  std::vector<uint64_t> packed(nodes, 0);
  run_threads(threads, static_cast<int64_t>(edges.size()), rng, [&](int64_t i) {
    const Edge& e = edges[i];
    if (e.a == e.b) return;
    atomic_max(&packed[e.a], mgccl::pick_key(e.sim, e.b).key);
    atomic_max(&packed[e.b], mgccl::pick_key(e.sim, e.a).key);
  });
  // float64: best similarity bits, then the largest inverted name among those reaching it.
  std::vector<uint64_t> sim_bits(nodes, 0);
  std::vector<uint32_t> names(nodes, 0);
  const auto key64 = [](const Edge& e, int32_t name) {
    return mgccl::pick_key(static_cast<double>(e.sim), name);
  };
  run_threads(threads, static_cast<int64_t>(edges.size()), rng, [&](int64_t i) {
    const Edge& e = edges[i];
    if (e.a == e.b) return;
    atomic_max(&sim_bits[e.a], key64(e, e.b).sim_bits);
    atomic_max(&sim_bits[e.b], key64(e, e.a).sim_bits);
  });
  run_threads(threads, static_cast<int64_t>(edges.size()), rng, [&](int64_t i) {
    const Edge& e = edges[i];
    if (e.a == e.b) return;
    const mgccl::PickKey64 for_a = key64(e, e.b), for_b = key64(e, e.a);
    if (for_a.sim_bits == std::atomic_ref<uint64_t>(sim_bits[e.a]).load())
      atomic_max(&names[e.a], for_a.name);
    if (for_b.sim_bits == std::atomic_ref<uint64_t>(sim_bits[e.b]).load())
      atomic_max(&names[e.b], for_b.name);
  });

  bool picks_ok = true;
  for (int32_t r = 0; r < nodes; ++r) {
    const mgccl::PickKey32 k32{packed[r]};
    const mgccl::PickKey64 k64{sim_bits[r], names[r]};
    if (best_name[r] < 0) {
      picks_ok &= k32.empty() && k64.empty();
      continue;
    }
    picks_ok &= !k32.empty() && k32.neighbour() == best_name[r] && !k64.empty() &&
                k64.neighbour() == best_name[r];
    const bool nan = std::isnan(best_sim[r]);
    picks_ok &= nan ? std::isnan(k32.sim()) && std::isnan(k64.sim())
                    : k32.sim() == best_sim[r] && k64.sim() == static_cast<double>(best_sim[r]);
  }
  check(picks_ok, "packed average-linkage picks", seed, threads);

  // One round: picked pairs at or above the threshold, united concurrently.
  const double threshold = 0.5;
  std::vector<std::pair<int32_t, int32_t>> picked;
  for (int32_t r = 0; r < nodes; ++r) {
    const mgccl::PickKey32 key{packed[r]};
    if (!key.empty() && mgccl::pick_merges(key.sim(), threshold))
      picked.emplace_back(r, key.neighbour());
  }
  const std::vector<int32_t> expected = sequential_roots(nodes, picked);
  std::vector<int32_t> parent(nodes);
  for (int32_t i = 0; i < nodes; ++i) parent[i] = i;
  std::atomic<int> merges{0};
  run_threads(threads, static_cast<int64_t>(picked.size()), rng, [&](int64_t i) {
    if (mgccl::unite_roots<YieldingAccess>(parent.data(), picked[i].first, picked[i].second)) {
      merges.fetch_add(1, std::memory_order_relaxed);
    }
  });
  for (int32_t i = 0; i < nodes; ++i)
    parent[i] = mgccl::find_root<mgccl::PlainAccess>(parent.data(), i);
  check(parent == expected, "average-linkage round partition", seed, threads);
  // Every successful hook joins two sets: the set count drops by exactly the merges.
  int32_t roots = 0;
  for (int32_t i = 0; i < nodes; ++i) roots += parent[i] == i;
  check(roots == nodes - merges.load(), "successful unites counted once", seed, threads);
}

}  // namespace

int main(int argc, char** argv) {
  const int seeds = argc > 1 ? std::atoi(argv[1]) : 40;
  const int max_threads = argc > 2 ? std::atoi(argv[2]) : 16;
  const int32_t nodes = argc > 3 ? std::atoi(argv[3]) : 3000;
  int runs = 0;
  for (int threads = 2; threads <= max_threads; threads *= 2) {
    for (int s = 0; s < seeds; ++s) {
      const uint32_t seed = static_cast<uint32_t>(1000 * threads + s);
      const int32_t size =
          1 + static_cast<int32_t>(seed * 2654435761u % static_cast<uint32_t>(nodes));
      test_components(size, threads, seed);
      test_pick_and_round(size, threads, seed);
      ++runs;
    }
  }
  std::printf("%d runs (threads 2..%d, %d seeds each, up to %d nodes): %d mismatches\n", runs,
              max_threads, seeds, nodes, failures);
  return failures == 0 ? 0 : 1;
}
