// Device helpers shared by the streaming CUDA kernels (lbfgs_direction, bfgs_direction, DRSOM):
// 16-byte vector loads and stores, block sums in a fixed order, a NaN-keeping max, and the
// last-block election that lets one launch finish a reduction without a host round trip.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace soo::cuda {

constexpr int kThreads = 256;  // threads per block of the streaming kernels
constexpr int kWarps = kThreads / 32;

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T x) { return static_cast<acc_t>(x); }

// Loads p[0..VEC) converted to acc_t; VEC == 4 uses one or two 16-byte / one 8-byte load.
template <int VEC, typename acc_t, typename T>
__device__ __forceinline__ void load_vec(const T* p, acc_t (&v)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) v[e] = to_acc<acc_t>(p[e]);
}
template <>
__device__ __forceinline__ void load_vec<4, float, float>(const float* p, float (&v)[4]) {
  const float4 x = *reinterpret_cast<const float4*>(p);
  v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
}
template <>
__device__ __forceinline__ void load_vec<4, double, double>(const double* p, double (&v)[4]) {
  const double2 a = reinterpret_cast<const double2*>(p)[0];
  const double2 b = reinterpret_cast<const double2*>(p)[1];
  v[0] = a.x; v[1] = a.y; v[2] = b.x; v[3] = b.y;
}
template <>
__device__ __forceinline__ void load_vec<4, float, c10::BFloat16>(const c10::BFloat16* p,
                                                                 float (&v)[4]) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);  // bf16 is the high half of a float
  v[0] = __uint_as_float(raw.x << 16);
  v[1] = __uint_as_float(raw.x & 0xffff0000u);
  v[2] = __uint_as_float(raw.y << 16);
  v[3] = __uint_as_float(raw.y & 0xffff0000u);
}

template <int VEC, typename T>
__device__ __forceinline__ void store_vec(T* p, const T (&v)[VEC]) {
#pragma unroll
  for (int e = 0; e < VEC; ++e) p[e] = v[e];
}
template <>
__device__ __forceinline__ void store_vec<4, float>(float* p, const float (&v)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
}
template <>
__device__ __forceinline__ void store_vec<4, double>(double* p, const double (&v)[4]) {
  reinterpret_cast<double2*>(p)[0] = make_double2(v[0], v[1]);
  reinterpret_cast<double2*>(p)[1] = make_double2(v[2], v[3]);
}

template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {  // keeps NaN, like torch.max
  return (a != a || b != b) ? (a != a ? a : b) : (b > a ? b : a);
}

// Block-wide sums of NV values in a fixed order; afterwards thread t < NV holds the total of
// value t.  smem: NV x kWarps scratch, free again on return.
template <int NV, typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t (&v)[NV], acc_t (*smem)[kWarps]) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int i = 0; i < NV; ++i) {
    acc_t x = v[i];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) x += __shfl_down_sync(0xffffffffu, x, off);
    if (lane == 0) smem[i][warp] = x;
  }
  __syncthreads();
  acc_t total = 0;
  if (threadIdx.x < NV)
    for (int w = 0; w < kWarps; ++w) total += smem[threadIdx.x][w];
  __syncthreads();  // smem may be reused right after
  return total;
}

// Elects the last block to finish; every block must call it after writing its partials.
__device__ __forceinline__ bool last_block_done(unsigned* counter) {
  __shared__ bool is_last;
  __threadfence();  // this block's partials are visible before its ticket
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(counter, 1u) == gridDim.x - 1;
  __syncthreads();
  return is_last;
}

}  // namespace soo::cuda
