// CUDA kernel of soo::bfgs_direction: three launches on the current stream, no host sync.
//
// 1. one block per row of H: (H g)_i and, when updating, u_i = (H y)_i;
// 2. one block: the reductions y.s, y.u, u.g, s.g, the scalars rho and c, d, g.d and max|d|;
// 3. (update only) H' = H + (c s_i s_j - rho (s_i u_j + u_i s_j)) over a 2-D grid, with
//    round-to-nearest intrinsics so that no FMA contraction breaks the exact symmetry of H'.
// Reductions run in a fixed order (strided per thread, then a fixed tree): deterministic.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../bfgs_direction.h"
#include "common.cuh"

namespace soo {
namespace {

using namespace soo::cuda;

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }

// Block-wide sums of NV values, returned to every thread.
template <int NV, typename acc_t>
__device__ __forceinline__ void block_sum_to_all(acc_t (&v)[NV]) {
  __shared__ acc_t smem[NV][kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    acc_t x = v[k];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) x += __shfl_down_sync(0xffffffffu, x, off);
    if (lane == 0) smem[k][warp] = x;
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    acc_t total = 0;
    for (int w = 0; w < kWarps; ++w) total += smem[k][w];
    v[k] = total;
  }
  __syncthreads();
}

template <typename acc_t, bool UPDATE>
__global__ void __launch_bounds__(kThreads)
bfgs_products(const acc_t* __restrict__ H, const acc_t* __restrict__ y,
              const acc_t* __restrict__ g, int64_t n, acc_t* __restrict__ u,
              acc_t* __restrict__ hg) {
  const acc_t* row = H + static_cast<int64_t>(blockIdx.x) * n;
  acc_t v[2] = {0, 0};
  for (int64_t j = threadIdx.x; j < n; j += kThreads) {
    const acc_t h = row[j];
    v[0] += h * g[j];
    if constexpr (UPDATE) v[1] += h * y[j];
  }
  block_sum_to_all<2>(v);
  if (threadIdx.x == 0) {
    hg[blockIdx.x] = v[0];
    if constexpr (UPDATE) u[blockIdx.x] = v[1];
  }
}

template <typename acc_t, bool UPDATE>
__global__ void __launch_bounds__(kThreads)
bfgs_finish(const acc_t* __restrict__ s, const acc_t* __restrict__ y,
            const acc_t* __restrict__ g, const acc_t* __restrict__ u,
            const acc_t* __restrict__ hg, int64_t n, acc_t* __restrict__ d,
            acc_t* __restrict__ scalars, acc_t* __restrict__ stats) {
  acc_t rho = 0, c = 0, ug = 0, sg = 0;
  if constexpr (UPDATE) {
    acc_t v[4] = {0, 0, 0, 0};  // y.s, y.u, u.g, s.g
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      v[0] += y[i] * s[i];
      v[1] += y[i] * u[i];
      v[2] += u[i] * g[i];
      v[3] += s[i] * g[i];
    }
    block_sum_to_all<4>(v);
    bfgs_scalars(v[0], v[1], &rho, &c);
    ug = v[2];
    sg = v[3];
    if (threadIdx.x == 0) {
      scalars[0] = rho;
      scalars[1] = c;
    }
  }
  acc_t gd = 0, dmax = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const acc_t di = UPDATE ? bfgs_direction_entry(hg[i], s[i], u[i], rho, c, ug, sg) : -hg[i];
    d[i] = di;
    gd += g[i] * di;
    dmax = nan_max(dmax, fabs(di));
  }
  __shared__ acc_t red[2][kWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    gd += __shfl_down_sync(0xffffffffu, gd, off);
    dmax = nan_max(dmax, __shfl_down_sync(0xffffffffu, dmax, off));
  }
  if (lane == 0) {
    red[0][warp] = gd;
    red[1][warp] = dmax;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t sum = 0, mx = 0;
    for (int w = 0; w < kWarps; ++w) {
      sum += red[0][w];
      mx = nan_max(mx, red[1][w]);
    }
    stats[0] = sum;
    stats[1] = mx;
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
bfgs_update(acc_t* __restrict__ H, const acc_t* __restrict__ s, const acc_t* __restrict__ u,
            const acc_t* __restrict__ scalars, int64_t n) {
  const int64_t i = blockIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= n) return;
  const acc_t rho = scalars[0], c = scalars[1];
  const acc_t si = s[i], ui = u[i], sj = s[j], uj = u[j];
  const acc_t cross = add_rn(mul_rn(si, uj), mul_rn(ui, sj));  // same bits for (j, i)
  const acc_t delta = add_rn(mul_rn(c, mul_rn(si, sj)), -mul_rn(rho, cross));
  H[i * n + j] = add_rn(H[i * n + j], delta);
}

std::tuple<at::Tensor, at::Tensor> bfgs_direction_cuda(at::Tensor& H, const at::Tensor& s,
                                                       const at::Tensor& y, const at::Tensor& g,
                                                       bool update) {
  check_bfgs_direction_args(H, s, y, g);
  const c10::cuda::CUDAGuard guard(g.device());
  const at::Tensor sc = s.contiguous(), yc = y.contiguous(), gc = g.contiguous();
  const int64_t n = g.size(0);
  TORCH_CHECK(n <= 65535, "bfgs_direction: n = ", n, " exceeds the CUDA kernel's 65535 rows");
  at::Tensor d = at::empty_like(gc);
  at::Tensor stats = at::empty({2}, g.options());
  at::Tensor work = at::empty({2 * n + 2}, g.options());  // u, H g, rho and c
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "bfgs_direction_cuda", [&] {
    scalar_t* u = work.data_ptr<scalar_t>();
    scalar_t* hg = u + n;
    scalar_t* scalars = hg + n;
    if (n > 0) {
      auto products = update ? bfgs_products<scalar_t, true> : bfgs_products<scalar_t, false>;
      products<<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
          H.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), n, u, hg);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    auto finish = update ? bfgs_finish<scalar_t, true> : bfgs_finish<scalar_t, false>;
    finish<<<1, kThreads, 0, stream>>>(sc.data_ptr<scalar_t>(), yc.data_ptr<scalar_t>(),
                                       gc.data_ptr<scalar_t>(), u, hg, n,
                                       d.data_ptr<scalar_t>(), scalars,
                                       stats.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (update && n > 0) {
      const dim3 grid(static_cast<unsigned>((n + kThreads - 1) / kThreads),
                      static_cast<unsigned>(n));
      bfgs_update<scalar_t><<<grid, kThreads, 0, stream>>>(H.data_ptr<scalar_t>(),
                                                           sc.data_ptr<scalar_t>(), u, scalars, n);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {d, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(soo, CUDA, m) {
  m.impl("bfgs_direction", &bfgs_direction_cuda);
}

}  // namespace soo
