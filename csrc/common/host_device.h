// Marks functions for both the host and the device, and the arithmetic that must round the same
// on both.
//
// MGCCL_HOST_DEVICE is `__host__ __device__` under nvcc and empty for the host compiler, so the
// headers of csrc/common/ compile into the CPU kernels (where the CPU tests run them) and the CUDA
// kernels alike. nvcc contracts a * b + c into one fused multiply-add by default while the host
// build (no -march) rounds the product and the sum separately; the exact_* helpers pin the
// rounding of every step, so both devices get bitwise the same similarities, and with them the
// same regions.
#pragma once

#if defined(__CUDACC__)
#define MGCCL_HOST_DEVICE __host__ __device__
#else
#define MGCCL_HOST_DEVICE
#endif

#include <cmath>

namespace mgccl {

// a + b, a * b, a / b and sqrt(a), each rounded once to nearest: never fused, never approximate.
MGCCL_HOST_DEVICE inline float exact_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
MGCCL_HOST_DEVICE inline double exact_add(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}
MGCCL_HOST_DEVICE inline float exact_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MGCCL_HOST_DEVICE inline double exact_mul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}
MGCCL_HOST_DEVICE inline float exact_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
MGCCL_HOST_DEVICE inline double exact_div(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __ddiv_rn(a, b);
#else
  return a / b;
#endif
}
MGCCL_HOST_DEVICE inline float exact_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}
MGCCL_HOST_DEVICE inline double exact_sqrt(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

}  // namespace mgccl
