// Union-find over a parent array, rooted at the smallest member of each set, for one host
// thread, many host threads or many device threads.
//
// unite() hooks the larger of two roots under the smaller with one compare-and-swap, so a root
// is always the smallest element of its set. Hooking only ever replaces a root's self-pointer
// (parent[r] == r) by a smaller index, and path halving only ever replaces a parent by one of
// its own ancestors, so concurrent finds and unites stay lock-free and correct: a failed CAS
// means the root was hooked meanwhile, and the unite retries from the new roots. For pixels in
// raster order the smallest member is the region's first pixel, the name DESIGN.md gives a
// region, and compact raster-order labels follow from the roots alone (compaction.h).
//
// The memory access goes through a policy with load / store / cas on int32_t slots:
//   PlainAccess       one host thread (the CPU kernels run one image per thread);
//   HostAtomicAccess  many host threads, std::atomic_ref (the race tests, tests_cpp/);
//   DeviceAtomicAccess  CUDA threads, atomicCAS (csrc/cuda/), defined only under nvcc.
#pragma once

#include <cstdint>

#include "host_device.h"

#if !defined(__CUDACC__)
#include <atomic>
#endif

namespace mgccl {

struct PlainAccess {
  MGCCL_HOST_DEVICE static int32_t load(const int32_t* slot) { return *slot; }
  MGCCL_HOST_DEVICE static void store(int32_t* slot, int32_t value) { *slot = value; }
  MGCCL_HOST_DEVICE static bool cas(int32_t* slot, int32_t expected, int32_t desired) {
    if (*slot != expected) return false;
    *slot = desired;
    return true;
  }
};

#if !defined(__CUDACC__)
// Relaxed order suffices: a parent only moves towards the root, and a thread that reads a stale
// parent just takes a longer path; the CAS itself decides every hook.
struct HostAtomicAccess {
  static int32_t load(const int32_t* slot) {
    return std::atomic_ref<int32_t>(*const_cast<int32_t*>(slot)).load(std::memory_order_relaxed);
  }
  static void store(int32_t* slot, int32_t value) {
    std::atomic_ref<int32_t>(*slot).store(value, std::memory_order_relaxed);
  }
  static bool cas(int32_t* slot, int32_t expected, int32_t desired) {
    return std::atomic_ref<int32_t>(*slot).compare_exchange_strong(expected, desired,
                                                                   std::memory_order_relaxed);
  }
};
#else
struct DeviceAtomicAccess {
  __device__ static int32_t load(const int32_t* slot) {
    return *static_cast<const volatile int32_t*>(slot);
  }
  __device__ static void store(int32_t* slot, int32_t value) {
    *static_cast<volatile int32_t*>(slot) = value;
  }
  __device__ static bool cas(int32_t* slot, int32_t expected, int32_t desired) {
    return atomicCAS(slot, expected, desired) == expected;
  }
};
#endif

// The root (smallest member) of x's set, halving the path on the way.
template <typename Access>
MGCCL_HOST_DEVICE inline int32_t find_root(int32_t* parent, int32_t x) {
  int32_t up = Access::load(parent + x);
  while (up != x) {
    const int32_t grand = Access::load(parent + up);
    if (grand == up) return up;
    Access::store(parent + x, grand);  // grand is an ancestor of x: halving is always safe
    x = grand;
    up = Access::load(parent + x);
  }
  return x;
}

// Joins the sets of a and b, hooking the larger root under the smaller; false when they were
// one set already (or became one through another thread's unite).
template <typename Access>
MGCCL_HOST_DEVICE inline bool unite_roots(int32_t* parent, int32_t a, int32_t b) {
  while (true) {
    a = find_root<Access>(parent, a);
    b = find_root<Access>(parent, b);
    if (a == b) return false;
    if (a < b) {
      const int32_t t = a;
      a = b;
      b = t;
    }
    if (Access::cas(parent + a, a, b)) return true;
  }
}

}  // namespace mgccl
