// CUDA kernels of the DRSOM ops (soo::drsom_perturb, drsom_reduce, drsom_update,
// drsom_subproblem): one launch each on the current stream, no host sync (t and alpha are read
// on the device).  drsom_subproblem is one thread running the scalar code of the CPU op.
//
// The k <= 8 direction pointers travel in a small struct passed by value (no host-device copy).
// drsom_reduce: grid-stride sweep with all dots in double registers (also for float32 vectors, as
// on the CPU; fixed layout for k = 8: q, the upper triangle of G, c), a block reduction in a fixed
// tree, per-block partials, and the last block to finish sums the partials in block order
// (run to run deterministic) and writes q, G and c, rounded once to the vectors' dtype.  Which
// elements a thread sums depends on the grid (capped at 4 blocks per SM) and on the load width,
// so the last bits can differ between GPU models and between aligned and unaligned buffers.
// Loads are 16-byte wide (4 elements) whenever n % 4 == 0 and every buffer is 16-byte aligned.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "../drsom.h"
#include "common.cuh"

namespace soo {
namespace {

using namespace soo::cuda;

constexpr int kMaxK = static_cast<int>(kDrsomMaxDirs);
constexpr int kTri = kMaxK * (kMaxK + 1) / 2;

template <typename T>
struct DirPtrs {
  const T* p[kMaxK];
};

template <typename T, bool SAVE, int VEC>
__global__ void __launch_bounds__(kThreads)
perturb_kernel(T* __restrict__ x, T* __restrict__ x0, const T* __restrict__ v,
               const T* __restrict__ t, int64_t n) {
  const T tv = *t;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; u < n / VEC;
       u += stride) {
    const int64_t i = u * VEC;
    T base[VEC], vv[VEC], out[VEC];
    load_vec<VEC>(SAVE ? x + i : x0 + i, base);
    load_vec<VEC>(v + i, vv);
    if constexpr (SAVE) store_vec<VEC>(x0 + i, base);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = base[e] + tv * vv[e];
    store_vec<VEC>(x + i, out);
  }
}

// p may alias one of the directions: no __restrict__ on them, and each thread reads all its
// direction entries before it writes p.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
update_kernel(T* __restrict__ x, T* p, DirPtrs<T> V, int k, const T* __restrict__ alpha,
              int64_t n) {
  T a[kMaxK];
#pragma unroll
  for (int j = 0; j < kMaxK; ++j) a[j] = j < k ? alpha[j] : T(0);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; u < n / VEC;
       u += stride) {
    const int64_t i = u * VEC;
    T step[VEC], xv[VEC];
    load_vec<VEC>(V.p[0] + i, step);
#pragma unroll
    for (int e = 0; e < VEC; ++e) step[e] *= a[0];
#pragma unroll
    for (int j = 1; j < kMaxK; ++j) {
      if (j < k) {
        T vv[VEC];
        load_vec<VEC>(V.p[j] + i, vv);
#pragma unroll
        for (int e = 0; e < VEC; ++e) step[e] += a[j] * vv[e];
      }
    }
    load_vec<VEC>(x + i, xv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) xv[e] += step[e];
    store_vec<VEC>(p + i, step);
    store_vec<VEC>(x + i, xv);
  }
}

// Fixed register layout of the dots: q_j at j, G_ab (a <= b) at kMaxK + tri(a, b), c_j at
// kMaxK + kTri + j.
__host__ __device__ constexpr int tri_index(int a, int b) {
  return a * kMaxK - a * (a - 1) / 2 + (b - a);
}

template <typename T, bool GRAM, int VEC>
__global__ void __launch_bounds__(kThreads)
reduce_kernel(const T* __restrict__ gp, const T* __restrict__ g, DirPtrs<T> V, int k, int64_t n,
              const T* __restrict__ t, double* partial, T* __restrict__ q, T* __restrict__ G,
              T* __restrict__ c, unsigned* counter) {
  constexpr int ND = GRAM ? 2 * kMaxK + kTri : kMaxK;
  __shared__ double smem[ND][kWarps];
  double acc[ND];
#pragma unroll
  for (int d = 0; d < ND; ++d) acc[d] = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; u < n / VEC;
       u += stride) {
    const int64_t i = u * VEC;
    T gpv[VEC], gv[VEC], vv[kMaxK][VEC];
    load_vec<VEC>(gp + i, gpv);
    load_vec<VEC>(g + i, gv);
#pragma unroll
    for (int j = 0; j < kMaxK; ++j) {
      if (j < k) {
        load_vec<VEC>(V.p[j] + i, vv[j]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) vv[j][e] = 0;
      }
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      const double diff = static_cast<double>(gpv[e]) - static_cast<double>(gv[e]);
#pragma unroll
      for (int j = 0; j < kMaxK; ++j)
        if (j < k) acc[j] += diff * static_cast<double>(vv[j][e]);
      if constexpr (GRAM) {
#pragma unroll
        for (int a = 0; a < kMaxK; ++a) {
          if (a < k) {
#pragma unroll
            for (int b = a; b < kMaxK; ++b)
              if (b < k)
                acc[kMaxK + tri_index(a, b)] +=
                    static_cast<double>(vv[a][e]) * static_cast<double>(vv[b][e]);
            acc[kMaxK + kTri + a] += static_cast<double>(gv[e]) * static_cast<double>(vv[a][e]);
          }
        }
      }
    }
  }
  const double total = block_sum<ND>(acc, smem);
  if (threadIdx.x < ND) partial[blockIdx.x * ND + threadIdx.x] = total;
  if (!last_block_done(counter)) return;
  if (threadIdx.x < ND) {
    const int d = threadIdx.x;
    double sum = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) sum += __ldcg(partial + b * ND + d);
    if (d < kMaxK) {
      if (d < k) q[d] = static_cast<T>(sum / static_cast<double>(*t));
    } else if (d < kMaxK + kTri) {
      int a = 0;
      while (d - kMaxK >= tri_index(a + 1, a + 1)) ++a;  // row of the triangle entry
      const int b = a + (d - kMaxK - tri_index(a, a));
      if (a < k && b < k) {
        G[a * k + b] = static_cast<T>(sum);
        G[b * k + a] = static_cast<T>(sum);
      }
    } else {
      const int j = d - kMaxK - kTri;
      if (j < k) c[j] = static_cast<T>(sum);
    }
  }
}

int num_blocks(int64_t n, int vec) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_block = static_cast<int64_t>(kThreads) * vec;
  return static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((n + per_block - 1) / per_block, 4 * sms)));
}

template <typename T>
DirPtrs<T> dir_ptrs(at::TensorList V) {
  DirPtrs<T> ptrs{};
  for (size_t j = 0; j < V.size(); ++j) ptrs.p[j] = V[j].data_ptr<T>();
  for (size_t j = V.size(); j < static_cast<size_t>(kMaxK); ++j) ptrs.p[j] = ptrs.p[0];
  return ptrs;
}

bool all_vec4(int64_t n, std::initializer_list<const void*> ptrs) {
  if (n % 4 != 0) return false;
  for (const void* p : ptrs)
    if (!aligned16(p)) return false;
  return true;
}

void drsom_perturb_cuda(at::Tensor& x, at::Tensor& x0, const at::Tensor& v, const at::Tensor& t,
                        bool save) {
  check_drsom_perturb_args(x, x0, v, t);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0);
  if (n == 0) return;
  const bool vec4 = all_vec4(n, {x.data_ptr(), x0.data_ptr(), v.data_ptr()});
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "drsom_perturb_cuda", [&] {
    auto fn = vec4 ? (save ? perturb_kernel<scalar_t, true, 4> : perturb_kernel<scalar_t, false, 4>)
                   : (save ? perturb_kernel<scalar_t, true, 1> : perturb_kernel<scalar_t, false, 1>);
    fn<<<num_blocks(n, vec4 ? 4 : 1), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), x0.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
        t.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> drsom_reduce_cuda(const at::Tensor& g_pert,
                                                                 const at::Tensor& g,
                                                                 at::TensorList V,
                                                                 const at::Tensor& t,
                                                                 bool with_gram) {
  check_drsom_reduce_args(g_pert, g, V, t);
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t n = g.size(0);
  const int k = static_cast<int>(V.size());
  at::Tensor q, G, c;
  std::tie(q, G, c) = drsom_reduce_outputs(g, k, with_gram);
  bool vec4 = all_vec4(n, {g_pert.data_ptr(), g.data_ptr()});
  for (const at::Tensor& vj : V) vec4 = vec4 && aligned16(vj.data_ptr());
  const int blocks = num_blocks(n, vec4 ? 4 : 1);
  const int nd = with_gram ? 2 * kMaxK + kTri : kMaxK;
  at::Tensor partial = at::empty({static_cast<int64_t>(blocks) * nd}, g.options().dtype(at::kDouble));
  at::Tensor counter = at::zeros({1}, g.options().dtype(at::kInt));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "drsom_reduce_cuda", [&] {
    auto fn = vec4 ? (with_gram ? reduce_kernel<scalar_t, true, 4> : reduce_kernel<scalar_t, false, 4>)
                   : (with_gram ? reduce_kernel<scalar_t, true, 1> : reduce_kernel<scalar_t, false, 1>);
    scalar_t* Gp = with_gram ? G.data_ptr<scalar_t>() : nullptr;
    scalar_t* cp = with_gram ? c.data_ptr<scalar_t>() : nullptr;
    fn<<<blocks, kThreads, 0, stream>>>(
        g_pert.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), dir_ptrs<scalar_t>(V), k, n,
        t.data_ptr<scalar_t>(), partial.data_ptr<double>(), q.data_ptr<scalar_t>(), Gp, cp,
        reinterpret_cast<unsigned*>(counter.data_ptr<int>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {q, G, c};
}

void drsom_update_cuda(at::Tensor& x, at::Tensor& p, at::TensorList V, const at::Tensor& alpha) {
  check_drsom_update_args(x, p, V, alpha);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = x.size(0);
  if (n == 0) return;
  bool vec4 = all_vec4(n, {x.data_ptr(), p.data_ptr()});
  for (const at::Tensor& vj : V) vec4 = vec4 && aligned16(vj.data_ptr());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "drsom_update_cuda", [&] {
    auto fn = vec4 ? update_kernel<scalar_t, 4> : update_kernel<scalar_t, 1>;
    fn<<<num_blocks(n, vec4 ? 4 : 1), kThreads, 0, stream>>>(
        x.data_ptr<scalar_t>(), p.data_ptr<scalar_t>(), dir_ptrs<scalar_t>(V),
        static_cast<int>(V.size()), alpha.data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename T>
__global__ void subproblem_kernel(const T* __restrict__ Q, const T* __restrict__ G,
                                  const T* __restrict__ c, int k, double gamma, double max_length,
                                  double gamma_increase, double reg, T* __restrict__ out) {
  // the matrices in shared memory, not on the thread's stack (see kDrsomSubproblemWorkspace)
  __shared__ double q[kMaxK * kMaxK], g[kMaxK * kMaxK], ws[kDrsomSubproblemWorkspace];
  double cv[kMaxK], o[kMaxK + kDrsomSubproblemExtra];
  for (int i = 0; i < k * k; ++i) {
    q[i] = Q[i];
    g[i] = G[i];
  }
  for (int i = 0; i < k; ++i) cv[i] = c[i];
  drsom_subproblem_solve(q, g, cv, k, gamma, max_length, gamma_increase, reg, ws, o);
  for (int i = 0; i < k + kDrsomSubproblemExtra; ++i) out[i] = static_cast<T>(o[i]);
}

at::Tensor drsom_subproblem_cuda(const at::Tensor& Q, const at::Tensor& G, const at::Tensor& c,
                                 double gamma, double max_length, double gamma_increase) {
  check_drsom_subproblem_args(Q, G, c, gamma, max_length, gamma_increase);
  const c10::cuda::CUDAGuard guard(Q.device());
  const int k = static_cast<int>(Q.size(0));
  const at::Tensor Qc = Q.contiguous(), Gc = G.contiguous(), cc = c.contiguous();
  at::Tensor out = at::empty({k + kDrsomSubproblemExtra}, Q.options());
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "drsom_subproblem_cuda", [&] {
    subproblem_kernel<scalar_t><<<1, 1, 0, stream>>>(
        Qc.data_ptr<scalar_t>(), Gc.data_ptr<scalar_t>(), cc.data_ptr<scalar_t>(), k, gamma,
        max_length, gamma_increase, drsom_subproblem_reg(Q.scalar_type()),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(soo, CUDA, m) {
  m.impl("drsom_perturb", &drsom_perturb_cuda);
  m.impl("drsom_reduce", &drsom_reduce_cuda);
  m.impl("drsom_update", &drsom_update_cuda);
  m.impl("drsom_subproblem", &drsom_subproblem_cuda);
}

}  // namespace soo
