// CPU kernel of soo::all_finite, and the argument checks and helpers shared with CUDA
// (csrc/all_finite.h).
//
// One pass over each tensor's storage as unsigned integers of the element's width, 32 bytes at a
// time (vec.h: AVX2, or two SSE ops in the baseline build): a lane is non-finite where its
// exponent bits are all set, and the lanes' flags are or-ed together (three integer ops per
// 32 bytes, no branch).  A tensor is split into chunks over threads (at::parallel_for); the
// answer is a bool, so it does not depend on the threads or the instruction set.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>

#include "../all_finite.h"
#include "vec.h"

namespace soo {

void check_all_finite_args(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    const at::ScalarType dt = t.scalar_type();
    TORCH_CHECK(dt == at::kDouble || dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
                "all_finite: every tensor must be float64, float32, bfloat16 or float16, got ",
                dt);
    TORCH_CHECK(t.device() == tensors[0].device(),
                "all_finite: all tensors must be on one device, got ", t.device(), " and ",
                tensors[0].device());
  }
}

at::Tensor dense_span(const at::Tensor& t) {
  return t.is_non_overlapping_and_dense() ? t : t.contiguous();
}

namespace {

constexpr int64_t kChunk = int64_t{1} << 16;  // elements per work item of at::parallel_for

template <typename Bits>
struct BitsVec;
template <>
struct BitsVec<uint16_t> {
  typedef uint16_t type __attribute__((vector_size(32)));
};
template <>
struct BitsVec<uint32_t> {
  typedef uint32_t type __attribute__((vector_size(32)));
};
template <>
struct BitsVec<uint64_t> {
  typedef uint64_t type __attribute__((vector_size(32)));
};

template <typename V, typename Bits>
SOO_ALWAYS_INLINE V load_bits(const Bits* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Whether any of p[0..n) has all the bits of `mask` set: four 32-byte vectors a step (their
// loads independent), then one at a time, then the elements left one by one.
template <typename Bits>
SOO_ALWAYS_INLINE bool any_nonfinite_span(const Bits* p, int64_t n, Bits mask) {
  using V = typename BitsVec<Bits>::type;
  constexpr int64_t W = sizeof(V) / sizeof(Bits);
  const V m = V{} + mask;
  decltype(V{} == V{}) hit{};  // lanes of -1 where an element was non-finite
  int64_t i = 0;
  for (; i + 4 * W <= n; i += 4 * W) {
    const V a = load_bits<V>(p + i), b = load_bits<V>(p + i + W);
    const V c = load_bits<V>(p + i + 2 * W), d = load_bits<V>(p + i + 3 * W);
    hit |= (((a & m) == m) | ((b & m) == m)) | (((c & m) == m) | ((d & m) == m));
  }
  for (; i + W <= n; i += W) {
    const V a = load_bits<V>(p + i);
    hit |= (a & m) == m;
  }
  bool any = false;
  for (int64_t l = 0; l < W; ++l) any |= hit[l] != 0;
  for (; i < n; ++i) any |= (p[i] & mask) == mask;
  return any;
}

template <typename Bits>
bool any_nonfinite_base(const Bits* p, int64_t n, Bits mask) {
  return any_nonfinite_span(p, n, mask);
}
#if SOO_HAVE_AVX2_PATH
template <typename Bits>
SOO_TARGET_AVX2 bool any_nonfinite_avx2(const Bits* p, int64_t n, Bits mask) {
  return any_nonfinite_span(p, n, mask);
}
#endif

at::Tensor all_finite_cpu(at::TensorList tensors) {
  check_all_finite_args(tensors);
  std::atomic<bool> bad{false};
  for (const at::Tensor& tensor : tensors) {
    if (tensor.numel() == 0) continue;
    const at::Tensor span = dense_span(tensor);
    dispatch_float_bits(span.scalar_type(), [&](auto bits, auto mask) {
      using Bits = decltype(bits);
      auto fn = any_nonfinite_base<Bits>;
#if SOO_HAVE_AVX2_PATH
      if (cpu::cpu_has_avx2()) fn = any_nonfinite_avx2<Bits>;
#endif
      const Bits* p = static_cast<const Bits*>(span.data_ptr());
      const int64_t n = span.numel();
      at::parallel_for(0, (n + kChunk - 1) / kChunk, 1, [&](int64_t c0, int64_t c1) {
        const int64_t lo = c0 * kChunk, hi = std::min(n, c1 * kChunk);
        if (fn(p + lo, hi - lo, mask)) bad.store(true, std::memory_order_relaxed);
      });
    });
  }
  return at::scalar_tensor(!bad.load(), tensors[0].options().dtype(at::kBool));
}

}  // namespace

TORCH_LIBRARY_IMPL(soo, CPU, m) { m.impl("all_finite", &all_finite_cpu); }

}  // namespace soo
