// CUDA kernel of soo::lbfgs_direction: two launches on the current stream, no host sync.
//
// Pass 1 streams the history once (rows in groups of kRows so g is re-read only every kRows
// rows), each block writing per-block partial dots; the last block to finish sums the partials
// in block order (deterministic), completes the Gram blocks and runs the O(m^2) recursion on
// the scalars.  Pass 2 streams the history again to form d, and its last block reduces g.d and
// max|d|.  Loads are 16-byte wide (4 elements) whenever n % 4 == 0 and the buffers are aligned.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

#include "../lbfgs_direction.h"
#include "common.cuh"

namespace soo {
namespace {

using namespace soo::cuda;

constexpr int kRows = 8;  // history rows per pass-1 sweep: 5 * kRows accumulators per thread

template <typename acc_t, typename hist_t, bool GRAM, int VEC>
__global__ void __launch_bounds__(kThreads)
direction_pass1(const hist_t* __restrict__ S, const hist_t* __restrict__ Y,
                const acc_t* __restrict__ g, int64_t n, int64_t m, int64_t newest, int64_t count,
                acc_t* partial, acc_t* dots, acc_t* SY, acc_t* YY, acc_t* coef, unsigned* counter) {
  constexpr int ND = GRAM ? kDotsWithGram : kDotsPlain;
  __shared__ acc_t smem[ND * kRows][kWarps];
  const int64_t n_vec = n / VEC;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const hist_t* s_new = S + newest * n;
  const hist_t* y_new = Y + newest * n;

  for (int64_t k0 = 0; k0 < count; k0 += kRows) {
    const int rows = count - k0 < kRows ? static_cast<int>(count - k0) : kRows;
    const hist_t* s_row[kRows];
    const hist_t* y_row[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t slot = ring_slot(newest, count, m, k0 + min(r, rows - 1));
      s_row[r] = S + slot * n;
      y_row[r] = Y + slot * n;
    }
    acc_t acc[ND * kRows];
#pragma unroll
    for (int v = 0; v < ND * kRows; ++v) acc[v] = 0;
    for (int64_t v = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; v < n_vec; v += stride) {
      const int64_t i = v * VEC;
      acc_t gv[VEC], sn[VEC], yn[VEC];
      load_vec<VEC>(g + i, gv);
      if constexpr (GRAM) {
        load_vec<VEC>(s_new + i, sn);
        load_vec<VEC>(y_new + i, yn);
      }
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (r < rows) {
          acc_t sv[VEC], yv[VEC];
          load_vec<VEC>(s_row[r] + i, sv);
          load_vec<VEC>(y_row[r] + i, yv);
#pragma unroll
          for (int e = 0; e < VEC; ++e) {
            acc[0 * kRows + r] += sv[e] * gv[e];
            acc[1 * kRows + r] += yv[e] * gv[e];
            if constexpr (GRAM) {
              acc[2 * kRows + r] += sv[e] * yn[e];
              acc[3 * kRows + r] += sn[e] * yv[e];
              acc[4 * kRows + r] += yv[e] * yn[e];
            }
          }
        }
      }
    }
    const acc_t total = block_sum<ND * kRows>(acc, smem);
    if (threadIdx.x < ND * kRows) {
      const int dot = threadIdx.x / kRows, r = threadIdx.x % kRows;
      if (r < rows) partial[blockIdx.x * ND * count + dot * count + k0 + r] = total;
    }
  }

  if (!last_block_done(counter)) return;
  for (int64_t v = threadIdx.x; v < ND * count; v += kThreads) {
    acc_t sum = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) sum += __ldcg(partial + b * ND * count + v);
    dots[v] = sum;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    if constexpr (GRAM) lbfgs_store_gram(dots, count, m, newest, SY, YY);
    lbfgs_coefficients(dots, dots + count, SY, YY, count, m, newest, coef);
  }
}

template <typename acc_t, typename hist_t, int VEC>
__global__ void __launch_bounds__(kThreads)
direction_pass2(const hist_t* __restrict__ S, const hist_t* __restrict__ Y,
                const acc_t* __restrict__ g, acc_t* __restrict__ d, int64_t n, int64_t m,
                int64_t newest, int64_t count, const acc_t* coef, acc_t* partial, acc_t* stats,
                unsigned* counter) {
  extern __shared__ unsigned char smem_raw[];
  int64_t* row = reinterpret_cast<int64_t*>(smem_raw);   // [count] row offsets
  acc_t* c = reinterpret_cast<acc_t*>(row + count);      // [1 + 2 count] coefficients
  __shared__ acc_t red[2][kWarps];
  for (int64_t k = threadIdx.x; k < count; k += kThreads) row[k] = ring_slot(newest, count, m, k) * n;
  for (int64_t k = threadIdx.x; k < 1 + 2 * count; k += kThreads) c[k] = count > 0 ? coef[k] : acc_t(1);
  __syncthreads();

  acc_t gd = 0, dmax = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; v < n / VEC; v += stride) {
    const int64_t i = v * VEC;
    acc_t gv[VEC], out[VEC];
    load_vec<VEC>(g + i, gv);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = c[0] * gv[e];
    for (int64_t k = 0; k < count; ++k) {
      acc_t sv[VEC], yv[VEC];
      load_vec<VEC>(S + row[k] + i, sv);
      load_vec<VEC>(Y + row[k] + i, yv);
      const acc_t cy = c[1 + k], cs = c[1 + count + k];
#pragma unroll
      for (int e = 0; e < VEC; ++e) out[e] += cy * yv[e] + cs * sv[e];
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      out[e] = -out[e];
      gd += gv[e] * out[e];
      dmax = nan_max(dmax, fabs(out[e]));
    }
    store_vec<VEC>(d + i, out);
  }

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int off = 16; off > 0; off /= 2) {
    gd += __shfl_down_sync(0xffffffffu, gd, off);
    dmax = nan_max(dmax, __shfl_down_sync(0xffffffffu, dmax, off));
  }
  if (lane == 0) { red[0][warp] = gd; red[1][warp] = dmax; }
  __syncthreads();
  if (threadIdx.x == 0) {
    acc_t sum = 0, mx = 0;
    for (int w = 0; w < kWarps; ++w) { sum += red[0][w]; mx = nan_max(mx, red[1][w]); }
    partial[2 * blockIdx.x] = sum;
    partial[2 * blockIdx.x + 1] = mx;
  }
  if (!last_block_done(counter)) return;
  if (threadIdx.x == 0) {
    acc_t sum = 0, mx = 0;
    for (unsigned b = 0; b < gridDim.x; ++b) {
      sum += __ldcg(partial + 2 * b);
      mx = nan_max(mx, __ldcg(partial + 2 * b + 1));
    }
    stats[0] = sum;
    stats[1] = mx;
  }
}

template <typename acc_t, typename hist_t, int VEC>
void launch(const at::Tensor& S, const at::Tensor& Y, at::Tensor& SY, at::Tensor& YY,
            const at::Tensor& g, at::Tensor& d, at::Tensor& stats, int64_t newest, int64_t count,
            bool update_gram) {
  const int64_t n = g.size(0), m = S.size(0);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_block = static_cast<int64_t>(kThreads) * VEC;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + per_block - 1) / per_block, 4 * sms)));
  const int ndots = update_gram ? kDotsWithGram : kDotsPlain;
  // Workspace: pass-1 partials, dots, coefficients, pass-2 partials.
  const int64_t n_partial1 = static_cast<int64_t>(blocks) * ndots * count;
  at::Tensor work = at::empty({n_partial1 + ndots * count + 1 + 2 * count + 2 * blocks}, g.options());
  acc_t* partial1 = work.data_ptr<acc_t>();
  acc_t* dots = partial1 + n_partial1;
  acc_t* coef = dots + ndots * count;
  acc_t* partial2 = coef + 1 + 2 * count;
  at::Tensor counters = at::zeros({2}, g.options().dtype(at::kInt));
  unsigned* counter = reinterpret_cast<unsigned*>(counters.data_ptr<int>());
  const hist_t* s_ptr = reinterpret_cast<const hist_t*>(S.data_ptr());
  const hist_t* y_ptr = reinterpret_cast<const hist_t*>(Y.data_ptr());
  auto stream = at::cuda::getCurrentCUDAStream();
  const size_t smem = count * sizeof(int64_t) + (1 + 2 * count) * sizeof(acc_t);
  // the dynamic part plus pass 2's static red[2][kWarps] must fit the 48 KB a block gets by default
  TORCH_CHECK(smem + 2 * kWarps * sizeof(acc_t) <= 48 * 1024, "lbfgs_direction: history_size ", m,
              " too large for the CUDA kernel");

  if (count > 0) {
    auto pass1 = update_gram ? direction_pass1<acc_t, hist_t, true, VEC> : direction_pass1<acc_t, hist_t, false, VEC>;
    pass1<<<blocks, kThreads, 0, stream>>>(s_ptr, y_ptr, g.data_ptr<acc_t>(), n, m, newest, count,
                                           partial1, dots, SY.data_ptr<acc_t>(),
                                           YY.data_ptr<acc_t>(), coef, counter);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  direction_pass2<acc_t, hist_t, VEC><<<blocks, kThreads, smem, stream>>>(
      s_ptr, y_ptr, g.data_ptr<acc_t>(), d.data_ptr<acc_t>(), n, m, newest, count, coef, partial2,
      stats.data_ptr<acc_t>(), counter + 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> lbfgs_direction_cuda(const at::Tensor& S, const at::Tensor& Y,
                                                        at::Tensor& SY, at::Tensor& YY,
                                                        const at::Tensor& g, int64_t newest,
                                                        int64_t count, bool update_gram) {
  check_lbfgs_direction_args(S, Y, SY, YY, g, newest, count);
  const c10::cuda::CUDAGuard guard(g.device());
  const at::Tensor Sc = S.contiguous(), Yc = Y.contiguous(), gc = g.contiguous();
  at::Tensor d = at::empty_like(gc);
  at::Tensor stats = at::empty({2}, g.options());
  const bool vec4 = g.size(0) % 4 == 0 && aligned16(Sc.data_ptr()) && aligned16(Yc.data_ptr()) &&
                    aligned16(gc.data_ptr()) && aligned16(d.data_ptr());
  auto run = [&](auto acc_tag, auto hist_tag) {
    using acc_t = decltype(acc_tag);
    using hist_t = decltype(hist_tag);
    if (vec4) launch<acc_t, hist_t, 4>(Sc, Yc, SY, YY, gc, d, stats, newest, count, update_gram);
    else launch<acc_t, hist_t, 1>(Sc, Yc, SY, YY, gc, d, stats, newest, count, update_gram);
  };
  if (g.scalar_type() == at::kDouble) run(double{}, double{});
  else if (S.scalar_type() == at::kBFloat16) run(float{}, at::BFloat16{});
  else run(float{}, float{});
  return {d, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(soo, CUDA, m) {
  m.impl("lbfgs_direction", &lbfgs_direction_cuda);
}

}  // namespace soo
