// CUDA kernels of the Kronecker-factor ops (csrc/kron.h): batched ATen linear algebra over the
// whole bucket [B, n, n] plus fused element-wise kernels, all on the current stream.
//
// Failures are handled on the device (no host round trip) where the ATen call allows it:
//   kron_damped_inverse  damping added in the copy kernel; linalg_cholesky_ex (check_errors =
//       false: no sync), failed factors replaced by I, X = L^{-T} L^{-1} by two batched triangular
//       solves (at::cholesky_inverse would read its info on the host); then the float64 retry
//       (damping' = 10 damping + eps32 |tr A| / n, trace on the device) runs over the WHOLE bucket
//       unconditionally, and a select kernel picks per matrix the first result that worked and
//       writes the status.  Cost of being sync-free: one float64 Cholesky + inverse per bucket
//       even when nothing failed.  No host sync at all.
//   kron_eigh            non-finite matrices are replaced by I before linalg_eigh (so they cannot
//       make it fail), statuses by a per-matrix kernel.  at::linalg_eigh itself synchronises (its
//       error check reads info on the host); since that sync is paid anyway, a bucket that fails
//       to converge is redone one matrix at a time (as the CPU path: one failure sends no other
//       matrix to the retry), and the float64 retry is compacted: one nonzero() on the failure
//       mask and a float64 eigh of only those matrices.
//   kron_inverse_root    eigh: kron_eigh, then one kernel W = Q diag((l + eps)^{-1/(2p)}) (W = 0
//       for a failed matrix), X = W W^T by one batched GEMM.  newton: the coupled iteration as
//       batched GEMMs over the bucket; per matrix a device-side step kernel computes max|M - I|,
//       accepts or rejects the step (growth > 1.2x or NaN) and updates err/active, and a select
//       kernel keeps X, M of the matrices that stopped.  The host reads "any matrix still
//       active" once every kNewtonCheckEvery iterations only (one small sync each), so up to
//       kNewtonCheckEvery - 1 masked iterations can run after the last matrix converged.
//   kfac_precondition_eigen  four batched GEMMs, the division by dG dA^T + damping fused in place.
//   kron_factor_update_  one baddbmm (addmm) into F, then a symmetrisation kernel (one thread per
//       pair i < j).
// Every GEMM here (factor statistics, eigh root W W^T, the Newton iteration, the eigenbasis
// preconditioning) follows torch's TF32 setting: with torch.backends.cuda.matmul.allow_tf32 on,
// float32 products keep 10 mantissa bits (the Newton iteration may then stop short of tol).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <tuple>

#include "../kron.h"

namespace soo {
namespace {

constexpr int kThreads = 256;
constexpr int kReduceThreads = 512;
constexpr int64_t kNewtonCheckEvery = 4;

int grid_for(int64_t total) {
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
  return static_cast<int>(std::max<int64_t>(1, std::min((total + kThreads - 1) / kThreads,
                                                        max_blocks)));
}

#define SOO_GRID_STRIDE(idx, total)                                                  \
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; \
       idx < (total); idx += static_cast<int64_t>(gridDim.x) * blockDim.x)

template <typename T>
__device__ __forceinline__ bool finite(T v) { return isfinite(v); }

// M = A + (damping + shift[b]) I  (shift may be null)
template <typename T>
__global__ void damp_kernel(const T* __restrict__ A, T* __restrict__ M, int64_t total, int64_t n,
                            T damping, const double* __restrict__ shift) {
  const int64_t nn = n * n;
  SOO_GRID_STRIDE(idx, total) {
    const int64_t r = idx % nn;
    T v = A[idx];
    if (r / n == r % n) v += damping + (shift ? static_cast<T>(shift[idx / nn]) : T(0));
    M[idx] = v;
  }
}

// shift[b] = 10 damping + eps32 |tr A64[b]| / n
__global__ void retry_shift_kernel(const double* __restrict__ A, double* __restrict__ shift,
                                   int64_t B, int64_t n, double damping) {
  SOO_GRID_STRIDE(b, B) {
    double tr = 0;
    for (int64_t i = 0; i < n; ++i) tr += A[b * n * n + i * n + i];
    shift[b] = 10.0 * damping + kKronEps32 * fabs(tr) / static_cast<double>(n > 1 ? n : 1);
  }
}

// M[b] = I where !keep[b] (keep from a Cholesky info == 0 or a finiteness flag); else unchanged
// (when src != M, M[b] = src[b]).  src may be M (so neither is __restrict__).
template <typename T>
__global__ void identity_where_kernel(const T* src, T* M,
                                      const int* __restrict__ info, const bool* __restrict__ keep,
                                      int64_t total, int64_t n) {
  const int64_t nn = n * n;
  SOO_GRID_STRIDE(idx, total) {
    const int64_t b = idx / nn, r = idx % nn;
    const bool k = info ? info[b] == 0 : keep[b];
    M[idx] = k ? src[idx] : (r / n == r % n ? T(1) : T(0));
  }
}

// ok[b] = (info == null || info[b] == 0) && (prev == null || prev[b]) && all finite X[b] (and
// all finite d[b] when d is given).  One block per matrix.
template <typename T>
__global__ void finite_flags_kernel(const T* __restrict__ X, const T* __restrict__ d, int64_t n,
                                    const int* __restrict__ info, const bool* __restrict__ prev,
                                    bool* __restrict__ ok) {
  const int64_t b = blockIdx.x, nn = n * n;
  const T* x = X + b * nn;
  int good = 1;
  for (int64_t i = threadIdx.x; i < nn; i += blockDim.x) good &= finite(x[i]);
  if (d)
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) good &= finite(d[b * n + i]);
  good = __syncthreads_and(good);
  if (threadIdx.x == 0)
    ok[b] = good && (info == nullptr || info[b] == 0) && (prev == nullptr || prev[b]);
}

// Damped inverse: out[b] = sym(X[b]) if ok, sym(X64[b]) if ok64, else 0 (sym(Y) = (Y + Y^T) / 2:
// the two triangular solves do not give an exactly symmetric inverse); status.
template <typename T>
__global__ void select_inverse_kernel(T* __restrict__ out, const T* __restrict__ X,
                                      const T* __restrict__ X64, const bool* __restrict__ ok,
                                      const bool* __restrict__ ok64, int* __restrict__ status,
                                      int64_t B, int64_t n) {
  const int64_t nn = n * n;
  SOO_GRID_STRIDE(idx, B * nn) {
    const int64_t b = idx / nn, r = idx % nn, i = r / n, j = r % n;
    const int64_t tdx = b * nn + j * n + i;
    out[idx] = ok[b] ? (X[idx] + X[tdx]) * T(0.5)
                     : (ok64[b] ? (X64[idx] + X64[tdx]) * T(0.5) : T(0));
  }
  SOO_GRID_STRIDE(b, B) status[b] = ok[b] ? kKronOk : (ok64[b] ? kKronFallback : kKronFailed);
}

// eigh: status 2 -> d = 0, Q = I; d clamped >= 0.
template <typename T>
__global__ void eigh_finalize_kernel(T* __restrict__ d, T* __restrict__ Q,
                                     const int* __restrict__ status, int64_t B, int64_t n) {
  const int64_t nn = n * n;
  SOO_GRID_STRIDE(idx, B * nn) {
    const int64_t b = idx / nn, r = idx % nn;
    if (status[b] == kKronFailed) Q[idx] = r / n == r % n ? T(1) : T(0);
  }
  SOO_GRID_STRIDE(idx, B * n) {
    const T v = d[idx];
    d[idx] = status[idx / n] == kKronFailed ? T(0) : (v < T(0) ? T(0) : v);
  }
}

// W = Q diag((d - min(d_min, 0) + eps)^{-1/(2p)}) (d ascending: d_min = d[b, 0]); 0 if failed.
template <typename T>
__global__ void root_scale_kernel(const T* __restrict__ Q, const T* __restrict__ d,
                                  const int* __restrict__ status, T* __restrict__ W, int64_t B,
                                  int64_t n, T eps, T expo) {
  const int64_t nn = n * n;
  SOO_GRID_STRIDE(idx, B * nn) {
    const int64_t b = idx / nn, j = idx % n;
    const T dmin = d[b * n] < T(0) ? d[b * n] : T(0);
    W[idx] = status[b] == kKronFailed ? T(0) : Q[idx] * pow(d[b * n + j] - dmin + eps, expo);
  }
}

// Newton init, one block per matrix: z = (p + 1) / (2 ||B||_F), X = z^{1/p} I, M = z B (in place
// of B), err = max|M - I|, active = err > tol.
template <typename T>
__global__ void newton_init_kernel(T* __restrict__ M, T* __restrict__ X, T* __restrict__ err,
                                   bool* __restrict__ active, int64_t n, int64_t p, T tol) {
  __shared__ double ssum[kReduceThreads];
  __shared__ T smax[kReduceThreads];
  const int64_t b = blockIdx.x, nn = n * n;
  T* m = M + b * nn;
  T* x = X + b * nn;
  double s = 0;
  for (int64_t i = threadIdx.x; i < nn; i += blockDim.x) s += static_cast<double>(m[i]) * m[i];
  ssum[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) ssum[threadIdx.x] += ssum[threadIdx.x + w];
    __syncthreads();
  }
  const T z = static_cast<T>((p + 1) / (2 * sqrt(ssum[0])));
  const T x0 = pow(z, static_cast<T>(1.0 / static_cast<double>(p)));
  T e = 0;
  for (int64_t i = threadIdx.x; i < nn; i += blockDim.x) {
    const bool diag = i / n == i % n;
    const T v = z * m[i];
    m[i] = v;
    x[i] = diag ? x0 : T(0);
    const T a = fabs(v - (diag ? T(1) : T(0)));
    e = (a > e || isnan(a)) ? a : e;
  }
  smax[threadIdx.x] = e;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) {
      const T o = smax[threadIdx.x + w];
      if (o > smax[threadIdx.x] || isnan(o)) smax[threadIdx.x] = o;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    err[b] = smax[0];
    active[b] = smax[0] > tol;
  }
}

// T = ((p + 1) I - M) / p
template <typename T>
__global__ void newton_t_kernel(const T* __restrict__ M, T* __restrict__ Tm, int64_t total,
                                int64_t n, T pp1, T p) {
  const int64_t nn = n * n;
  SOO_GRID_STRIDE(idx, total) {
    const int64_t r = idx % nn;
    Tm[idx] = ((r / n == r % n ? pp1 : T(0)) - M[idx]) / p;
  }
}

// One block per matrix: en = max|Mn - I|; the step is taken when the matrix is active and
// en <= growth * err (a NaN is a growth); then err = en and active = en > tol; else active = 0.
template <typename T>
__global__ void newton_step_kernel(const T* __restrict__ Mn, T* __restrict__ err,
                                   bool* __restrict__ active, bool* __restrict__ take, int64_t n,
                                   T tol, T growth) {
  __shared__ T smax[kReduceThreads];
  const int64_t b = blockIdx.x, nn = n * n;
  const bool act = active[b];
  T e = 0;
  if (act) {
    const T* m = Mn + b * nn;
    for (int64_t i = threadIdx.x; i < nn; i += blockDim.x) {
      const T a = fabs(m[i] - (i / n == i % n ? T(1) : T(0)));
      e = (a > e || isnan(a)) ? a : e;
    }
  }
  smax[threadIdx.x] = e;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w /= 2) {
    if (threadIdx.x < w) {
      const T o = smax[threadIdx.x + w];
      if (o > smax[threadIdx.x] || isnan(o)) smax[threadIdx.x] = o;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const T en = smax[0];
    const bool t = act && en <= growth * err[b];
    take[b] = t;
    if (t) err[b] = en;
    active[b] = t && en > tol;
  }
}

// X[b] = Xn[b], M[b] = Mn[b] where take[b]
template <typename T>
__global__ void newton_select_kernel(T* __restrict__ X, T* __restrict__ M,
                                     const T* __restrict__ Xn, const T* __restrict__ Mn,
                                     const bool* __restrict__ take, int64_t total, int64_t nn) {
  SOO_GRID_STRIDE(idx, total) {
    if (take[idx / nn]) {
      X[idx] = Xn[idx];
      M[idx] = Mn[idx];
    }
  }
}

// One block per matrix: status = 2 (and X = 0) when X is not finite, else 0 if err <= tol, else 1.
template <typename T>
__global__ void newton_finish_kernel(T* __restrict__ X, const T* __restrict__ err,
                                     int* __restrict__ status, int64_t n, T tol) {
  const int64_t b = blockIdx.x, nn = n * n;
  T* x = X + b * nn;
  int good = 1;
  for (int64_t i = threadIdx.x; i < nn; i += blockDim.x) good &= finite(x[i]);
  good = __syncthreads_and(good);
  if (!good)
    for (int64_t i = threadIdx.x; i < nn; i += blockDim.x) x[i] = T(0);
  if (threadIdx.x == 0) status[b] = !good ? kKronFailed : (err[b] <= tol ? kKronOk : kKronFallback);
}

// inner[b, k, j] /= dG[b, k] dA[b, j] + damping
template <typename T>
__global__ void eigen_divide_kernel(T* __restrict__ inner, const T* __restrict__ dG,
                                    const T* __restrict__ dA, int64_t total, int64_t o, int64_t i,
                                    T damping) {
  SOO_GRID_STRIDE(idx, total) {
    const int64_t row = idx / i, j = idx % i, b = row / o;
    inner[idx] = inner[idx] / (dG[row] * dA[b * i + j] + damping);
  }
}

// F <- (F + F^T) / 2: the thread of each pair i < j writes both entries.
template <typename T>
__global__ void symmetrize_kernel(T* __restrict__ F, int64_t total, int64_t d) {
  const int64_t dd = d * d;
  SOO_GRID_STRIDE(idx, total) {
    const int64_t b = idx / dd, r = idx % dd, i = r / d, j = r % d;
    if (i < j) {
      T* m = F + b * dd;
      const T v = (m[i * d + j] + m[j * d + i]) * T(0.5);
      m[i * d + j] = v;
      m[j * d + i] = v;
    }
  }
}

at::Tensor as_stack(const at::Tensor& A) {
  const int64_t n = A.size(-1);
  return A.reshape({stack_count(A), n, n}).contiguous();
}

c10::IntArrayRef batch_of(const at::Tensor& A) { return A.sizes().slice(0, A.dim() - 2); }

#define SOO_LAUNCH(kernel, total, ...)                                                   \
  do {                                                                                   \
    if ((total) > 0) {                                                                   \
      kernel<<<grid_for(total), kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__); \
      C10_CUDA_KERNEL_LAUNCH_CHECK();                                                    \
    }                                                                                    \
  } while (0)

// ---- kron_damped_inverse -----------------------------------------------------------------------

// (A3 + (damping + shift) I)^{-1} by Cholesky, I inverted in place of a failed factor; (X, info).
template <typename T>
std::tuple<at::Tensor, at::Tensor> cholesky_inverse_info(const at::Tensor& A3, T damping,
                                                         const at::Tensor& shift) {
  const int64_t B = A3.size(0), n = A3.size(-1), total = B * n * n;
  at::Tensor M = at::empty_like(A3);
  SOO_LAUNCH(damp_kernel<T>, total, A3.const_data_ptr<T>(), M.data_ptr<T>(), total, n, damping,
             shift.defined() ? shift.const_data_ptr<double>() : nullptr);
  auto [L, info] = at::linalg_cholesky_ex(M, false, false);  // no sync
  L = L.contiguous();
  SOO_LAUNCH(identity_where_kernel<T>, total, L.const_data_ptr<T>(), L.data_ptr<T>(),
             info.const_data_ptr<int>(), nullptr, total, n);
  // X = L^{-T} L^{-1} by two triangular solves (cuBLAS trsm): at::cholesky_inverse would check
  // its info on the host (a sync); trsm has no info.
  at::Tensor eye = at::eye(n, A3.options()).expand({B, n, n});
  at::Tensor Linv = at::linalg_solve_triangular(L, eye, /*upper=*/false);
  at::Tensor X = at::linalg_solve_triangular(L.mT(), Linv, /*upper=*/true).contiguous();
  return {X, info};
}

std::tuple<at::Tensor, at::Tensor> kron_damped_inverse_cuda(const at::Tensor& A, double damping) {
  check_kron_square("kron_damped_inverse", A);
  c10::cuda::CUDAGuard guard(A.device());
  at::Tensor A3 = as_stack(A);
  const int64_t B = A3.size(0), n = A3.size(-1), nn = n * n;
  at::Tensor status = at::empty({B}, A.options().dtype(at::kInt));
  at::Tensor X, out;
  if (B == 0 || n == 0) return {at::empty_like(A), status.zero_().view(batch_of(A))};
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "kron_damped_inverse_cuda", [&] {
    at::Tensor info;
    std::tie(X, info) =
        cholesky_inverse_info<scalar_t>(A3, static_cast<scalar_t>(damping), at::Tensor());
    // a non-finite entry fails its matrix (Cholesky reads one triangle only)
    at::Tensor finite_in = at::empty({B}, A.options().dtype(at::kBool));
    finite_flags_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        A3.const_data_ptr<scalar_t>(), nullptr, n, nullptr, nullptr, finite_in.data_ptr<bool>());
    at::Tensor ok = at::empty({B}, A.options().dtype(at::kBool));
    finite_flags_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        X.const_data_ptr<scalar_t>(), nullptr, n, info.const_data_ptr<int>(),
        finite_in.const_data_ptr<bool>(), ok.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // float64 retry of the whole bucket (sync-free: nobody asks the host which ones failed)
    at::Tensor A64 = A3.to(at::kDouble);
    at::Tensor shift = at::empty({B}, A64.options());
    SOO_LAUNCH(retry_shift_kernel, B, A64.const_data_ptr<double>(), shift.data_ptr<double>(), B,
               n, damping);
    auto [X64d, info64] = cholesky_inverse_info<double>(A64, 0.0, shift);
    at::Tensor X64 = X64d.to(A.scalar_type()).contiguous();
    at::Tensor ok64 = at::empty({B}, A.options().dtype(at::kBool));
    finite_flags_kernel<scalar_t><<<B, kThreads, 0, stream>>>(
        X64.const_data_ptr<scalar_t>(), nullptr, n, info64.const_data_ptr<int>(),
        finite_in.const_data_ptr<bool>(), ok64.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    out = at::empty_like(X);
    SOO_LAUNCH(select_inverse_kernel<scalar_t>, std::max<int64_t>(B * nn, B),
               out.data_ptr<scalar_t>(), X.const_data_ptr<scalar_t>(),
               X64.const_data_ptr<scalar_t>(), ok.const_data_ptr<bool>(),
               ok64.const_data_ptr<bool>(), status.data_ptr<int>(), B, n);
  });
  return {out.view(A.sizes()), status.view(batch_of(A))};
}

// ---- kron_eigh ---------------------------------------------------------------------------------

// d [B, n], Q [B, n, n], status [B] of a contiguous stack (see the file comment).
std::tuple<at::Tensor, at::Tensor, at::Tensor> eigh_stack(const at::Tensor& A3) {
  const int64_t B = A3.size(0), n = A3.size(-1), nn = n * n, total = B * nn;
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor status = at::empty({B}, A3.options().dtype(at::kInt));
  if (B == 0 || n == 0)
    return {at::empty({B, n}, A3.options()), at::empty_like(A3), status.zero_()};
  at::Tensor d, Q;
  AT_DISPATCH_FLOATING_TYPES(A3.scalar_type(), "kron_eigh_cuda", [&] {
    using T = scalar_t;
    at::Tensor fin = at::empty({B}, A3.options().dtype(at::kBool));
    finite_flags_kernel<T><<<B, kThreads, 0, stream>>>(A3.const_data_ptr<T>(), nullptr, n, nullptr,
                                                       nullptr, fin.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor Ain = at::empty_like(A3);  // non-finite matrices -> I (they cannot fail eigh)
    SOO_LAUNCH(identity_where_kernel<T>, total, A3.const_data_ptr<T>(), Ain.data_ptr<T>(), nullptr,
               fin.const_data_ptr<bool>(), total, n);
    at::Tensor good = at::empty({B}, A3.options().dtype(at::kBool));
    // Only a failed convergence (c10::LinAlgError) is a failed factor: out-of-memory and launch
    // errors propagate.
    at::Tensor converged;  // int "info" per matrix (0: converged); undefined: all converged
    try {
      std::tie(d, Q) = at::linalg_eigh(Ain);
    } catch (const c10::LinAlgError&) {
      // Some matrix did not converge (linalg_eigh synchronised for its error check): each one
      // alone in its own dtype, as on the CPU, so that one failure sends no other to the retry.
      d = at::zeros({B, n}, A3.options());
      Q = at::zeros_like(A3);
      converged = at::ones({B}, A3.options().dtype(at::kInt));
      for (int64_t b = 0; b < B; ++b) {
        try {
          auto [db, Qb] = at::linalg_eigh(Ain[b]);
          d[b].copy_(db);
          Q[b].copy_(Qb);
          converged[b].fill_(0);
        } catch (const c10::LinAlgError&) {
        }
      }
    }
    d = d.contiguous();
    Q = Q.contiguous();
    finite_flags_kernel<T><<<B, kThreads, 0, stream>>>(
        Q.const_data_ptr<T>(), d.const_data_ptr<T>(), n,
        converged.defined() ? converged.const_data_ptr<int>() : nullptr,
        fin.const_data_ptr<bool>(), good.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    status.copy_(at::where(good, kKronOk, kKronFailed));
    // Retry in float64 the finite matrices that failed: compacted (a host sync; linalg_eigh has
    // synchronised for its own error check already).
    at::Tensor redo = at::nonzero(fin & good.logical_not()).squeeze(1);
    if (redo.numel() > 0) {
      at::Tensor sub = Ain.index_select(0, redo).to(at::kDouble);
      at::Tensor d64, Q64, ok64;
      try {
        std::tie(d64, Q64) = at::linalg_eigh(sub);
        ok64 = d64.isfinite().all(-1) & Q64.isfinite().flatten(1).all(-1);
      } catch (const c10::LinAlgError&) {  // one at a time, so that one failure spoils no other
        d64 = at::zeros({redo.numel(), n}, sub.options());
        Q64 = at::zeros_like(sub);
        ok64 = at::zeros({redo.numel()}, sub.options().dtype(at::kBool));
        for (int64_t k = 0; k < redo.numel(); ++k) {
          try {
            auto [dk, Qk] = at::linalg_eigh(sub[k]);
            d64[k].copy_(dk);
            Q64[k].copy_(Qk);
            ok64[k].fill_(dk.isfinite().all() & Qk.isfinite().all());
          } catch (const c10::LinAlgError&) {
          }
        }
      }
      at::Tensor idx = redo.masked_select(ok64);
      d.index_copy_(0, idx, d64.index_select(0, ok64.nonzero().squeeze(1)).to(d.scalar_type()));
      Q.index_copy_(0, idx, Q64.index_select(0, ok64.nonzero().squeeze(1)).to(Q.scalar_type()));
      status.index_fill_(0, idx, kKronFallback);
    }
    SOO_LAUNCH(eigh_finalize_kernel<T>, total, d.data_ptr<T>(), Q.data_ptr<T>(),
               status.const_data_ptr<int>(), B, n);
  });
  return {d, Q, status};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_eigh_cuda(const at::Tensor& A) {
  check_kron_square("kron_eigh", A);
  c10::cuda::CUDAGuard guard(A.device());
  auto [d, Q, status] = eigh_stack(as_stack(A));
  std::vector<int64_t> dshape(batch_of(A).begin(), batch_of(A).end());
  dshape.push_back(A.size(-1));
  return {d.view(dshape), Q.view(A.sizes()), status.view(batch_of(A))};
}

// ---- kron_inverse_root -------------------------------------------------------------------------

template <typename T>
at::Tensor newton_stack(const at::Tensor& A3, int64_t p, double eps, int64_t max_iters,
                        double tol, const at::Tensor& status) {
  const int64_t B = A3.size(0), n = A3.size(-1), nn = n * n, total = B * nn;
  auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor M = at::empty_like(A3), X = at::empty_like(A3), Tm = at::empty_like(A3);
  at::Tensor err = at::empty({B}, A3.options());
  at::Tensor active = at::empty({B}, A3.options().dtype(at::kBool));
  at::Tensor take = at::empty({B}, A3.options().dtype(at::kBool));
  const T tol_t = static_cast<T>(tol);
  SOO_LAUNCH(damp_kernel<T>, total, A3.const_data_ptr<T>(), M.data_ptr<T>(), total, n,
             static_cast<T>(eps), nullptr);
  newton_init_kernel<T><<<B, kReduceThreads, 0, stream>>>(M.data_ptr<T>(), X.data_ptr<T>(),
                                                          err.data_ptr<T>(),
                                                          active.data_ptr<bool>(), n, p, tol_t);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (int64_t it = 0; it < max_iters; ++it) {
    // the only host sync of the loop, once every kNewtonCheckEvery iterations
    if (it % kNewtonCheckEvery == 0 && !active.any().item<bool>()) break;
    SOO_LAUNCH(newton_t_kernel<T>, total, M.const_data_ptr<T>(), Tm.data_ptr<T>(), total, n,
               static_cast<T>(p + 1), static_cast<T>(p));
    at::Tensor Xn = at::bmm(X, Tm);
    at::Tensor result, base = Tm;
    for (int64_t e = p; e > 0;) {  // T^p by binary powering
      if (e & 1) result = result.defined() ? at::bmm(result, base) : base;
      e >>= 1;
      if (e) base = at::bmm(base, base);
    }
    at::Tensor Mn = at::bmm(result, M);
    newton_step_kernel<T><<<B, kReduceThreads, 0, stream>>>(
        Mn.const_data_ptr<T>(), err.data_ptr<T>(), active.data_ptr<bool>(), take.data_ptr<bool>(),
        n, tol_t, static_cast<T>(kKronNewtonGrowth));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    SOO_LAUNCH(newton_select_kernel<T>, total, X.data_ptr<T>(), M.data_ptr<T>(),
               Xn.const_data_ptr<T>(), Mn.const_data_ptr<T>(), take.const_data_ptr<bool>(), total,
               nn);
  }
  newton_finish_kernel<T><<<B, kThreads, 0, stream>>>(X.data_ptr<T>(), err.const_data_ptr<T>(),
                                                      status.data_ptr<int>(), n, tol_t);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return X;
}

std::tuple<at::Tensor, at::Tensor> kron_inverse_root_cuda(const at::Tensor& A, int64_t p,
                                                          double epsilon, c10::string_view method,
                                                          int64_t max_iters, double tol) {
  const std::string meth(method.data(), method.size());
  check_kron_inverse_root_args(A, p, epsilon, meth, max_iters, tol);
  c10::cuda::CUDAGuard guard(A.device());
  at::Tensor A3 = as_stack(A);
  const int64_t B = A3.size(0), n = A3.size(-1), total = B * n * n;
  if (B == 0 || n == 0)
    return {at::empty_like(A), at::zeros({B}, A.options().dtype(at::kInt)).view(batch_of(A))};
  at::Tensor X, status;
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "kron_inverse_root_cuda", [&] {
    using T = scalar_t;
    if (meth == "eigh") {
      auto [d, Q, st] = eigh_stack(A3);
      at::Tensor W = at::empty_like(Q);
      SOO_LAUNCH(root_scale_kernel<T>, total, Q.const_data_ptr<T>(), d.const_data_ptr<T>(),
                 st.const_data_ptr<int>(), W.data_ptr<T>(), B, n, static_cast<T>(epsilon),
                 static_cast<T>(-1.0 / (2.0 * static_cast<double>(p))));
      X = at::bmm(W, W.mT());
      status = st;
    } else {
      status = at::empty({B}, A.options().dtype(at::kInt));
      X = newton_stack<T>(A3, p, epsilon, max_iters, tol, status);
    }
  });
  return {X.view(A.sizes()), status.view(batch_of(A))};
}

// ---- kfac_precondition_eigen -------------------------------------------------------------------

at::Tensor kfac_precondition_eigen_cuda(const at::Tensor& grad, const at::Tensor& QG,
                                        const at::Tensor& dG, const at::Tensor& QA,
                                        const at::Tensor& dA, double damping) {
  check_kfac_precondition_args(grad, QG, dG, QA, dA);
  c10::cuda::CUDAGuard guard(grad.device());
  const int64_t o = grad.size(-2), i = grad.size(-1);
  at::Tensor inner = at::matmul(at::matmul(QG.mT(), grad), QA).contiguous();
  at::Tensor dGc = dG.contiguous(), dAc = dA.contiguous();
  const int64_t total = inner.numel();
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "kfac_precondition_eigen_cuda", [&] {
    SOO_LAUNCH(eigen_divide_kernel<scalar_t>, total, inner.data_ptr<scalar_t>(),
               dGc.const_data_ptr<scalar_t>(), dAc.const_data_ptr<scalar_t>(), total, o, i,
               static_cast<scalar_t>(damping));
  });
  return at::matmul(at::matmul(QG, inner), QA.mT());
}

// ---- kron_factor_update_ -----------------------------------------------------------------------

void kron_factor_update_cuda(const at::Tensor& F, const at::Tensor& X, double decay,
                             double scale) {
  c10::cuda::CUDAGuard guard(F.device());
  kron_factor_update(F, X, decay, scale, [](const at::Tensor& F3) {
    const int64_t total = F3.numel(), d = F3.size(-1);
    AT_DISPATCH_FLOATING_TYPES(F3.scalar_type(), "kron_symmetrize_cuda", [&] {
      SOO_LAUNCH(symmetrize_kernel<scalar_t>, total, F3.data_ptr<scalar_t>(), total, d);
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(soo, CUDA, m) {
  m.impl("kron_factor_update_", &kron_factor_update_cuda);
  m.impl("kron_damped_inverse", &kron_damped_inverse_cuda);
  m.impl("kron_eigh", &kron_eigh_cuda);
  m.impl("kron_inverse_root", &kron_inverse_root_cuda);
  m.impl("kfac_precondition_eigen", &kfac_precondition_eigen_cuda);
}

}  // namespace soo
