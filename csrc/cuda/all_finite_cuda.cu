// CUDA kernel of soo::all_finite: launches on the current stream, no host sync.
//
// The flag starts true (one fill) and a thread that sees a non-finite element stores false into
// it: a plain store, as every writer writes the same value.  The tensors are checked by dtype,
// up to kMaxSpans of them a launch (their pointers and lengths passed by value), so a step's
// gradients of one dtype take one launch: the span is blockIdx.y, and the blocks along x sweep
// it grid-stride, one 16-byte load a thread and step from its first 16-byte-aligned element; the
// elements before that (head) and after the last full 16 bytes (tail), fewer than 16 bytes each,
// are read one by one by the first block's threads.  Bits, not values (csrc/all_finite.h): no
// conversion of bfloat16 and float16.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "../all_finite.h"
#include "common.cuh"

namespace soo {
namespace {

using namespace soo::cuda;

constexpr int kMaxSpans = 48;  // spans a launch: 768 bytes of kernel parameters

template <typename Bits>
struct Spans {
  const Bits* p[kMaxSpans];
  int64_t n[kMaxSpans];
};

template <typename Bits>
__device__ __forceinline__ bool nonfinite(Bits x, Bits mask) { return (x & mask) == mask; }

template <typename Bits>
__global__ void __launch_bounds__(kThreads)
all_finite_kernel(Spans<Bits> spans, Bits mask, bool* ok) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(Bits));
  const Bits* p = spans.p[blockIdx.y];
  const int64_t n = spans.n[blockIdx.y];
  const int64_t misaligned = reinterpret_cast<std::uintptr_t>(p) % 16 / sizeof(Bits);
  const int64_t to_aligned = misaligned ? kVec - misaligned : 0;
  const int64_t head = to_aligned < n ? to_aligned : n;
  const int64_t units = (n - head) / kVec, tail = head + units * kVec;
  const int64_t t = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  bool bad = false;
  for (int64_t u = t; u < units; u += static_cast<int64_t>(gridDim.x) * kThreads) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p + head + u * kVec);
    Bits e[kVec];
    memcpy(e, &raw, sizeof raw);
#pragma unroll
    for (int i = 0; i < kVec; ++i) bad |= nonfinite(e[i], mask);
  }
  if (t < head) bad |= nonfinite(p[t], mask);
  if (t < n - tail) bad |= nonfinite(p[tail + t], mask);
  if (bad) *ok = false;
}

int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

at::Tensor all_finite_cuda(at::TensorList tensors) {
  check_all_finite_args(tensors);
  const c10::cuda::CUDAGuard guard(tensors[0].device());
  at::Tensor ok = at::ones({}, tensors[0].options().dtype(at::kBool));
  std::vector<at::Tensor> spans;  // copies of strided tensors are freed in stream order
  for (const at::Tensor& t : tensors)
    if (t.numel()) spans.push_back(dense_span(t));
  auto stream = at::cuda::getCurrentCUDAStream();
  for (const at::ScalarType dtype : {at::kDouble, at::kFloat, at::kBFloat16, at::kHalf}) {
    dispatch_float_bits(dtype, [&](auto bits, auto mask) {
      using Bits = decltype(bits);
      Spans<Bits> batch{};
      int count = 0;
      int64_t longest = 0;
      auto launch = [&] {
        // along x: enough blocks for the longest span's 16-byte units, at most a wave of
        // 4 blocks an SM shared by the launch's spans
        const int64_t units = (longest * static_cast<int64_t>(sizeof(Bits)) + 15) / 16;
        const int64_t wave = std::max<int64_t>(1, 4 * sm_count() / count);
        const int64_t blocks = std::max<int64_t>(
            1, std::min({(units + kThreads - 1) / kThreads, wave, int64_t{65535}}));
        const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(count));
        all_finite_kernel<Bits><<<grid, kThreads, 0, stream>>>(batch, mask,
                                                                ok.data_ptr<bool>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        count = 0;
        longest = 0;
      };
      for (const at::Tensor& t : spans) {
        if (t.scalar_type() != dtype) continue;
        batch.p[count] = static_cast<const Bits*>(t.data_ptr());
        batch.n[count] = t.numel();
        longest = std::max(longest, t.numel());
        if (++count == kMaxSpans) launch();
      }
      if (count) launch();
    });
  }
  return ok;
}

}  // namespace

TORCH_LIBRARY_IMPL(soo, CUDA, m) { m.impl("all_finite", &all_finite_cuda); }

}  // namespace soo
