// CUDA kernels of the window ops (soo::window_gram, window_combine): launches on the current
// stream, no host sync (coef and base_coef are read on the device).
//
// window_gram's dots stream the window once.  A grid of (row tiles) x (column blocks); a block
// takes a tile of R rows (R = 8 for k <= 2, 4 for k <= 8: R k <= 32 float64 accumulators a
// thread) and sweeps its columns grid-stride, VEC consecutive columns per thread and step: one
// 16-byte load per row and vector (4 float32, 2 float64; 4 bfloat16 in 8 bytes) where every
// buffer is 16-byte aligned and n % VEC == 0, else one column with scalar loads.  A step issues
// its R + k loads before any product and reuses the vectors' columns over the R rows (the
// vectors are read m / R times, from L2: the tiles of one column block run together).  Products
// and sums in float64 whatever the storage (as on the CPU), a block reduction in a fixed tree,
// per-block partials, and a second launch sums each dot's partials in a fixed order (a warp a
// dot): run to run deterministic.  The grid is one wave (as many blocks as the SMs hold, by the
// occupancy calculator), so the last bits can differ between GPU models and between aligned and
// unaligned buffers.  Rows are in the grid's x: no 65535 limit on m.  The full Gram matrix comes
// from float64 GEMMs over column chunks (cuBLAS through at::mm, window_gram_full).
// window_combine: the same sweep, VEC columns per thread and step, each summed over the rows in
// float64 in the CPU kernel's order (rows four at a time, their loads issued together).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

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

// The type a loaded element is held in until it is widened to double (exactly): float for
// float32 and bfloat16 (whose bits are a float's top half), double for float64.
template <typename T>
using Held = std::conditional_t<std::is_same_v<T, double>, double, float>;

// Columns per thread and step on the vector path: one 16-byte load of a float32 / float64
// vector (a bfloat16 window row: 8 bytes).
template <typename TV>
constexpr int kVec = 16 / static_cast<int>(sizeof(TV));

// v[0..VEC) = p[0..VEC): one vector load for VEC > 1 (the caller checked the alignment).
template <int VEC, typename T>
__device__ __forceinline__ void load_held(const T* p, Held<T> (&v)[VEC]) {
  if constexpr (VEC == 2) {
    static_assert(std::is_same_v<T, double>);
    const double2 x = *reinterpret_cast<const double2*>(p);
    v[0] = x.x;
    v[1] = x.y;
  } else {
    load_vec<VEC>(p, v);
  }
}

// p[0..VEC) = v: one vector store for VEC > 1.
template <int VEC, typename T>
__device__ __forceinline__ void store_held(T* p, const T (&v)[VEC]) {
  if constexpr (VEC == 2) {
    static_assert(std::is_same_v<T, double>);
    *reinterpret_cast<double2*>(p) = make_double2(v[0], v[1]);
  } else {
    store_vec<VEC>(p, v);
  }
}

// Rows per tile for k <= KB vectors.
template <int KB>
constexpr int kTileRows = KB <= 2 ? 8 : 4;

// partial[(col_block * rows + row) * k + j] = sum over the block's columns of W[row] X[j]
// for the tile's rows (tile = blockIdx.x, col_block = blockIdx.y); KB >= k.
template <typename TW, typename TX, int KB, int VEC>
__global__ void __launch_bounds__(kThreads)
dots_kernel(const TW* __restrict__ W, VecPtrs<TX> X, int k, int64_t rows, int64_t n,
            double* __restrict__ partial) {
  constexpr int R = kTileRows<KB>;
  constexpr int NV = R * KB;
  __shared__ double smem[NV][kWarps];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * R;
  const int nr = rows - row0 < R ? static_cast<int>(rows - row0) : R;  // block-uniform
  const TW* w0 = W + row0 * n;
  double acc[NV];
#pragma unroll
  for (int d = 0; d < NV; ++d) acc[d] = 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * kThreads;
  for (int64_t u = blockIdx.y * static_cast<int64_t>(kThreads) + threadIdx.x; u < n / VEC;
       u += stride) {
    const int64_t c = u * VEC;
    Held<TX> x[KB][VEC];
    Held<TW> w[R][VEC];
#pragma unroll
    for (int j = 0; j < KB; ++j) {
      if (j < k) {
        load_held<VEC>(X.p[j] + c, x[j]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) x[j][e] = 0;
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r < nr) {
        load_held<VEC>(w0 + r * n + c, w[r]);
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) w[r][e] = 0;
      }
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      double xe[KB];
#pragma unroll
      for (int j = 0; j < KB; ++j) xe[j] = static_cast<double>(x[j][e]);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < nr) {
          const double we = static_cast<double>(w[r][e]);
#pragma unroll
          for (int j = 0; j < KB; ++j) acc[r * KB + j] += we * xe[j];
        }
      }
    }
  }
  const double total = block_sum<NV>(acc, smem);
  if (threadIdx.x < NV) {
    const int r = threadIdx.x / KB, j = threadIdx.x % KB;
    if (r < nr && j < k) partial[(blockIdx.y * rows + row0 + r) * k + j] = total;
  }
}

// D[d] = the sum of the dot d's partials (d = row * k + j; partial[b * dots + d]), one warp a
// dot: lane l sums blocks l, l + 32, ... in order, then a fixed shuffle tree.
__global__ void __launch_bounds__(kThreads)
dots_finish_kernel(const double* __restrict__ partial, int blocks, int64_t dots,
                   double* __restrict__ D) {
  const int64_t d = blockIdx.x * static_cast<int64_t>(kWarps) + threadIdx.x / 32;
  if (d >= dots) return;  // the whole warp
  const int lane = threadIdx.x % 32;
  double total = 0.0;
  for (int b = lane; b < blocks; b += 32) total += partial[b * dots + d];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) total += __shfl_down_sync(0xffffffffu, total, off);
  if (lane == 0) D[d] = total;
}

// out[c] = base_coef base[c] + sum_{i < rows} coef[i] W[i][c], VEC columns per thread and step.
// Rows four at a time, ((c0 w0 + c1 w1) + (c2 w2 + c3 w3)) added to the sum, the last ones one at
// a time: the CPU kernel's order.  The coefficients are read at uniform addresses (one L1
// broadcast a warp).  out may alias base: each thread reads base's columns before it writes them.
template <typename TW, typename TO, int VEC>
__global__ void __launch_bounds__(kThreads)
combine_kernel(TO* out, const TW* __restrict__ W, const double* __restrict__ coef, int64_t rows,
               int64_t n, const TO* base, const double* __restrict__ base_coef) {
  const double bc = base ? *base_coef : 0.0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; u < n / VEC;
       u += stride) {
    const TW* wc = W + u * VEC;
    double acc[VEC];
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] = 0.0;
    int64_t i = 0;
#pragma unroll 2
    for (; i + 4 <= rows; i += 4) {
      Held<TW> w[4][VEC];
#pragma unroll
      for (int q = 0; q < 4; ++q) load_held<VEC>(wc + (i + q) * n, w[q]);
      const double c0 = coef[i], c1 = coef[i + 1], c2 = coef[i + 2], c3 = coef[i + 3];
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        acc[e] += (c0 * static_cast<double>(w[0][e]) + c1 * static_cast<double>(w[1][e])) +
                  (c2 * static_cast<double>(w[2][e]) + c3 * static_cast<double>(w[3][e]));
    }
    for (; i < rows; ++i) {
      Held<TW> w[VEC];
      load_held<VEC>(wc + i * n, w);
      const double ci = coef[i];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] += ci * static_cast<double>(w[e]);
    }
    TO o[VEC];
    if (base) {
      TO b[VEC];
      load_held<VEC>(base + u * VEC, b);
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[e] = static_cast<TO>(acc[e] + bc * static_cast<double>(b[e]));
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) o[e] = static_cast<TO>(acc[e]);
    }
    store_held<VEC>(out + u * VEC, o);
  }
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// Vector loads (VEC columns, 16 bytes) when n % VEC == 0 and every buffer is 16-byte aligned.
bool vector_path(int64_t n, int vec, std::initializer_list<const void*> ptrs) {
  if (n % vec != 0) return false;
  for (const void* p : ptrs)
    if (p && !aligned16(p)) return false;
  return true;
}

// Blocks of `kernel` one SM holds at once (its registers decide: 1 to 4 for these kernels).
// The emulation has no occupancy calculator: 4.
template <typename Kernel>
int resident_blocks(Kernel kernel) {
#ifdef __CUDACC__
  int blocks = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
  return std::max(blocks, 1);
#else
  return 4;
#endif
}

// Column blocks per tile of a grid-stride kernel over `units` units of work: the `tiles` tiles
// share one wave of `resident` blocks per SM (rounded down: a partial second wave would double
// the time), at least one block per tile, at most one per kThreads units.
int64_t grid_blocks(int64_t units, int64_t tiles, int resident) {
  const int64_t wave = std::max<int64_t>(1, int64_t{resident} * sm_count() / tiles);
  return std::max<int64_t>(1, std::min({(units + kThreads - 1) / kThreads, wave,
                                        int64_t{65535}}));
}

template <typename TW, typename TX, int KB>
void launch_dots(const at::Tensor& W, at::TensorList X, int64_t rows, const at::Tensor& D) {
  const int64_t n = W.size(1), k = static_cast<int64_t>(X.size());
  VecPtrs<TX> ptrs;
  for (int j = 0; j < kMaxK; ++j) ptrs.p[j] = X[j < k ? j : 0].template data_ptr<TX>();
  bool vec = vector_path(n, kVec<TX>, {W.data_ptr()});
  for (const at::Tensor& x : X) vec = vec && aligned16(x.data_ptr());
  const int step = vec ? kVec<TX> : 1;
  auto fn = vec ? dots_kernel<TW, TX, KB, kVec<TX>> : dots_kernel<TW, TX, KB, 1>;
  const int64_t tiles = (rows + kTileRows<KB> - 1) / kTileRows<KB>;
  const int64_t blocks = grid_blocks(n / step, tiles, resident_blocks(fn));
  at::Tensor partial = at::empty({blocks * rows * k}, W.options().dtype(at::kDouble));
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(blocks));
  fn<<<grid, kThreads, 0, stream>>>(static_cast<const TW*>(W.data_ptr()), ptrs,
                                   static_cast<int>(k), rows, n, partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t dots = rows * k;
  const unsigned finish_blocks = static_cast<unsigned>((dots + kWarps - 1) / kWarps);
  dots_finish_kernel<<<finish_blocks, kThreads, 0, stream>>>(
      partial.data_ptr<double>(), static_cast<int>(blocks), dots, D.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> window_gram_cuda(const at::Tensor& W, at::TensorList X,
                                                    int64_t rows, bool full) {
  check_window_gram_args(W, X, rows);
  const c10::cuda::CUDAGuard guard(W.device());
  const int64_t n = W.size(1), k = static_cast<int64_t>(X.size());
  at::Tensor G, D;
  std::tie(G, D) = window_gram_outputs(W, k, full);
  if (full) window_gram_full(W, rows, G);
  if (k == 0 || rows == 0 || n == 0) return {G, D};
  dispatch_window(W.scalar_type(), [&](auto tw, auto tx) {
    using TW = decltype(tw);
    using TX = decltype(tx);
    if (k == 1) {
      launch_dots<TW, TX, 1>(W, X, rows, D);
    } else if (k == 2) {
      launch_dots<TW, TX, 2>(W, X, rows, D);
    } else if (k <= 4) {
      launch_dots<TW, TX, 4>(W, X, rows, D);
    } else {
      launch_dots<TW, TX, kMaxK>(W, X, rows, D);
    }
  });
  return {G, D};
}

void window_combine_cuda(at::Tensor& out, const at::Tensor& W, const at::Tensor& coef,
                         int64_t rows, const std::optional<at::Tensor>& base,
                         const std::optional<at::Tensor>& base_coef) {
  check_window_combine_args(out, W, coef, rows, base, base_coef);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t n = out.size(0);
  if (n == 0) return;
  auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_window(W.scalar_type(), [&](auto tw, auto to) {
    using TW = decltype(tw);
    using TO = decltype(to);
    const TO* bp = base.has_value() ? base->data_ptr<TO>() : nullptr;
    const bool vec = vector_path(n, kVec<TO>, {out.data_ptr(), W.data_ptr(), bp});
    auto fn = vec ? combine_kernel<TW, TO, kVec<TO>> : combine_kernel<TW, TO, 1>;
    const int64_t blocks = grid_blocks(vec ? n / kVec<TO> : n, 1, resident_blocks(fn));
    fn<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        out.data_ptr<TO>(), static_cast<const TW*>(W.data_ptr()), coef.data_ptr<double>(), rows,
        n, bp, base.has_value() ? base_coef->data_ptr<double>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(soo, CUDA, m) {
  m.impl("window_gram", &window_gram_cuda);
  m.impl("window_combine", &window_combine_cuda);
}

}  // namespace soo
