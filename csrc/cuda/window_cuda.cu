// CUDA kernels of the window ops (soo::window_gram, window_combine): launches on the current
// stream, no host sync (coef and base_coef are read on the device).
//
// window_gram's dots: a grid of (rows) x (column blocks) (rows in x: no 65535 limit on m, and the
// blocks of one column range run together, so the vectors' chunk is reused from L2); each thread
// sums its columns' products for the k vectors in double registers (also for float32 / bfloat16
// storage, as on the CPU), a block reduction in a fixed tree, per-block partials, and a second
// launch sums each dot's partials in block order (run to run deterministic).  The full Gram
// matrix comes from float64 GEMMs over column chunks (cuBLAS through at::mm, window_gram_full).
// window_combine: a grid-stride sweep, each element summed over the rows in row order in double.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../window.h"
#include "common.cuh"

namespace soo {
namespace {

using namespace soo::cuda;

constexpr int kMaxK = static_cast<int>(kWindowMaxVectors);

template <typename T>
struct VecPtrs {
  const T* p[kMaxK];
};

template <typename T>
__device__ __forceinline__ double widen(T x) { return static_cast<double>(static_cast<float>(x)); }
template <>
__device__ __forceinline__ double widen<double>(double x) { return x; }

// partial[(row * gridDim.y + block) * k + j] = sum over the block's columns of W[row] X[j]
// (row = blockIdx.x, block = blockIdx.y)
template <typename TW, typename TX>
__global__ void __launch_bounds__(kThreads)
dots_kernel(const TW* __restrict__ W, VecPtrs<TX> X, int k, int64_t n,
            double* __restrict__ partial) {
  __shared__ double smem[kMaxK][kWarps];
  const int64_t row = blockIdx.x;
  const TW* w = W + row * n;
  double acc[kMaxK];
#pragma unroll
  for (int j = 0; j < kMaxK; ++j) acc[j] = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * kThreads;
  for (int64_t c = blockIdx.y * static_cast<int64_t>(kThreads) + threadIdx.x; c < n; c += stride) {
    const double wc = widen(w[c]);
#pragma unroll
    for (int j = 0; j < kMaxK; ++j)
      if (j < k) acc[j] += wc * widen(X.p[j][c]);
  }
  const double total = block_sum<kMaxK>(acc, smem);
  if (threadIdx.x < k) partial[(row * gridDim.y + blockIdx.y) * k + threadIdx.x] = total;
}

// D[row * k + j] = the partials of (row, j) summed in block order (one thread per dot)
__global__ void __launch_bounds__(kThreads)
dots_finish_kernel(const double* __restrict__ partial, int blocks, int k, int64_t dots,
                   double* __restrict__ D) {
  const int64_t d = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (d >= dots) return;
  const int64_t row = d / k, j = d % k;
  double total = 0.0;
  for (int b = 0; b < blocks; ++b) total += partial[(row * blocks + b) * k + j];
  D[d] = total;
}

// out may alias base: each thread reads base[c] before it writes out[c].
template <typename TW, typename TO>
__global__ void __launch_bounds__(kThreads)
combine_kernel(TO* out, const TW* __restrict__ W, const double* __restrict__ coef, int64_t rows,
               int64_t n, const TO* base, const double* __restrict__ base_coef) {
  const double bc = base ? *base_coef : 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t c = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; c < n; c += stride) {
    double acc = 0.0;
    for (int64_t i = 0; i < rows; ++i) acc += coef[i] * widen(W[i * n + c]);
    if (base) acc += bc * widen(base[c]);
    out[c] = static_cast<TO>(acc);
  }
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

std::tuple<at::Tensor, at::Tensor> window_gram_cuda(const at::Tensor& W, at::TensorList X,
                                                    int64_t rows, bool full) {
  check_window_gram_args(W, X, rows);
  const c10::cuda::CUDAGuard guard(W.device());
  const int64_t n = W.size(1), k = static_cast<int64_t>(X.size());
  at::Tensor G, D;
  std::tie(G, D) = window_gram_outputs(W, k, full);
  if (full) window_gram_full(W, rows, G);
  if (k == 0 || rows == 0 || n == 0) return {G, D};
  // about 4 blocks per SM over all rows, at least one per row (so blocks <= 4 SMs: gridDim.y ok)
  const int64_t wanted = std::max<int64_t>(1, 4 * sm_count() / rows);
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, wanted));
  at::Tensor partial = at::empty({rows * blocks * k}, W.options().dtype(at::kDouble));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_window(W.scalar_type(), [&](auto tw, auto tx) {
    using TW = decltype(tw);
    using TX = decltype(tx);
    VecPtrs<TX> ptrs;
    for (int j = 0; j < kMaxK; ++j) ptrs.p[j] = X[j < k ? j : 0].template data_ptr<TX>();
    const dim3 grid(static_cast<unsigned>(rows), blocks);
    dots_kernel<TW, TX><<<grid, kThreads, 0, stream>>>(
        static_cast<const TW*>(W.data_ptr()), ptrs, static_cast<int>(k), n,
        partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t dots = rows * k;
  const unsigned finish_blocks = static_cast<unsigned>((dots + kThreads - 1) / kThreads);
  dots_finish_kernel<<<finish_blocks, kThreads, 0, stream>>>(
      partial.data_ptr<double>(), blocks, static_cast<int>(k), dots, D.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {G, D};
}

void window_combine_cuda(at::Tensor& out, const at::Tensor& W, const at::Tensor& coef,
                         int64_t rows, const std::optional<at::Tensor>& base,
                         const std::optional<at::Tensor>& base_coef) {
  check_window_combine_args(out, W, coef, rows, base, base_coef);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.size(0);
  if (n == 0) return;
  const int blocks = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 4 * sm_count())));
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_window(W.scalar_type(), [&](auto tw, auto to) {
    using TW = decltype(tw);
    using TO = decltype(to);
    combine_kernel<TW, TO><<<blocks, kThreads, 0, stream>>>(
        out.data_ptr<TO>(), static_cast<const TW*>(W.data_ptr()), coef.data_ptr<double>(), rows,
        n, base.has_value() ? base->data_ptr<TO>() : nullptr,
        base.has_value() ? base_coef->data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(soo, CUDA, m) {
  m.impl("window_gram", &window_gram_cuda);
  m.impl("window_combine", &window_combine_cuda);
}

}  // namespace soo
