// The average-linkage pick (DESIGN.md op 5): every region takes its most similar adjacent
// region, ties going to the smaller name, and the cosine of two regions from their feature sums.
//
// The pick with its tie rule is one comparison of packed keys: the similarity's bits mapped to
// an unsigned integer of the same order, then the inverted neighbour name (so a smaller name is
// a larger key). For float32 similarities the key is one uint64_t and the GPU takes each
// region's best neighbour with a single atomicMax; float64 similarities need 64 bits alone, so
// their key is a pair compared lexicographically (the GPU takes the best similarity, then the
// smallest name among the neighbours that reach it). NaN sorts below every number (it never
// passes a threshold, so it can never win a merge). Key 0 means "no neighbour yet".
//
// Region cosines sum over the channels in kLanes interleaved partial sums (channel c in lane
// c % kLanes) combined by halving (lane l += lane l + h for h = kLanes / 2, ..., 1): what a warp
// computes with one channel per lane and a butterfly shuffle, and what the CPU loop vectorises.
#pragma once

#include <cstdint>
#include <cstring>

#include "host_device.h"
#include "pixel_graph.h"

namespace mgccl {

MGCCL_HOST_DEVICE inline uint32_t float_bits(float v) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(v);
#else
  uint32_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
#endif
}

MGCCL_HOST_DEVICE inline uint64_t double_bits(double v) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(v));
#else
  uint64_t bits;
  std::memcpy(&bits, &v, sizeof bits);
  return bits;
#endif
}

// Unsigned integers in the order of the values: 0 for NaN, then -inf < ... < inf, with -0 and
// +0 equal (as they compare), so the name decides between them.
MGCCL_HOST_DEVICE inline uint32_t ordered_bits(float v) {
  if (v != v) return 0;
  const uint32_t bits = float_bits(v);
  return (bits & 0x80000000u) ? ~bits + 1u : bits | 0x80000000u;
}
MGCCL_HOST_DEVICE inline uint64_t ordered_bits(double v) {
  if (v != v) return 0;
  const uint64_t bits = double_bits(v);
  return (bits & 0x8000000000000000ull) ? ~bits + 1ull : bits | 0x8000000000000000ull;
}

MGCCL_HOST_DEVICE inline float float_from_bits(uint32_t bits) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#endif
}
MGCCL_HOST_DEVICE inline double double_from_bits(uint64_t bits) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(bits));
#else
  double v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
#endif
}

// The inverse of ordered_bits (0 -> NaN, the sign bit of a zero -> +0).
MGCCL_HOST_DEVICE inline float value_of_ordered(uint32_t ordered) {
  if (ordered == 0) return float_from_bits(0x7FC00000u);
  return float_from_bits((ordered & 0x80000000u) ? ordered & 0x7FFFFFFFu : ~(ordered - 1u));
}
MGCCL_HOST_DEVICE inline double value_of_ordered(uint64_t ordered) {
  if (ordered == 0) return double_from_bits(0x7FF8000000000000ull);
  return double_from_bits((ordered & 0x8000000000000000ull) ? ordered & 0x7FFFFFFFFFFFFFFFull
                                                            : ~(ordered - 1ull));
}

// The name part of a key: larger for smaller names (names are >= 0).
MGCCL_HOST_DEVICE inline uint32_t inverted_name(int32_t name) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(name);
}
MGCCL_HOST_DEVICE inline int32_t name_of(uint32_t inverted) {
  return static_cast<int32_t>(0xFFFFFFFFu - inverted);
}

// The pick key of neighbour `name` at similarity `sim`, for float32 and float64 similarities.
struct PickKey32 {
  uint64_t key = 0;
  MGCCL_HOST_DEVICE bool empty() const { return key == 0; }
  MGCCL_HOST_DEVICE int32_t neighbour() const {
    return name_of(static_cast<uint32_t>(key & 0xFFFFFFFFull));
  }
  MGCCL_HOST_DEVICE float sim() const { return value_of_ordered(static_cast<uint32_t>(key >> 32)); }
  MGCCL_HOST_DEVICE bool operator>(const PickKey32& other) const { return key > other.key; }
};
struct PickKey64 {
  uint64_t sim_bits = 0;  // ordered_bits of the similarity
  uint32_t name = 0;      // inverted_name of the neighbour
  MGCCL_HOST_DEVICE bool empty() const { return sim_bits == 0 && name == 0; }
  MGCCL_HOST_DEVICE int32_t neighbour() const { return name_of(name); }
  MGCCL_HOST_DEVICE double sim() const { return value_of_ordered(sim_bits); }
  MGCCL_HOST_DEVICE bool operator>(const PickKey64& other) const {
    return sim_bits != other.sim_bits ? sim_bits > other.sim_bits : name > other.name;
  }
};

template <typename acc_t>
struct PickKeyOf;
template <>
struct PickKeyOf<float> {
  using type = PickKey32;
};
template <>
struct PickKeyOf<double> {
  using type = PickKey64;
};

MGCCL_HOST_DEVICE inline PickKey32 pick_key(float sim, int32_t name) {
  return {(static_cast<uint64_t>(ordered_bits(sim)) << 32) | inverted_name(name)};
}
MGCCL_HOST_DEVICE inline PickKey64 pick_key(double sim, int32_t name) {
  return {ordered_bits(sim), inverted_name(name)};
}

// Whether a pick at similarity `sim` merges at `threshold` (compared in float64, like single
// linkage's edges; NaN never merges).
template <typename acc_t>
MGCCL_HOST_DEVICE inline bool pick_merges(acc_t sim, double threshold) {
  return static_cast<double>(sim) >= threshold;
}

// Interleaved partial sums of the region cosine (see the header comment).
constexpr int kLanes = 32;

// Folds lane sums partial[0..kLanes) into partial[0] by halving.
template <typename acc_t>
MGCCL_HOST_DEVICE inline acc_t fold_lanes(acc_t* partial) {
  for (int half = kLanes / 2; half > 0; half /= 2) {
    for (int l = 0; l < half; ++l) partial[l] = exact_add(partial[l], partial[l + half]);
  }
  return partial[0];
}

// <u, v> over `channels` in the lane order (host: one thread does all lanes).
template <typename acc_t>
inline acc_t lane_dot(const acc_t* u, const acc_t* v, int64_t channels) {
  acc_t partial[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= channels; c += kLanes) {
    for (int l = 0; l < kLanes; ++l)
      partial[l] = exact_add(partial[l], exact_mul(u[c + l], v[c + l]));
  }
  for (int l = 0; c + l < channels; ++l)
    partial[l] = exact_add(partial[l], exact_mul(u[c + l], v[c + l]));
  return fold_lanes(partial);
}

// The norm of a region's feature sum: sqrt of its lane_dot with itself.
template <typename acc_t>
MGCCL_HOST_DEVICE inline acc_t norm_of_dot(acc_t self_dot) {
  return exact_sqrt(self_dot);
}

// The norm of a one-pixel region from its pixel's norm: |x| / max(|x|, eps).
template <typename acc_t>
MGCCL_HOST_DEVICE inline acc_t unit_norm(acc_t pixel_norm) {
  const acc_t eps = static_cast<acc_t>(kNormEps);
  return exact_div(pixel_norm, pixel_norm < eps ? eps : pixel_norm);
}

}  // namespace mgccl
