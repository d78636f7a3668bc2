// CPU kernels of the window ops (soo::window_gram, window_combine) and the argument checks and
// helpers shared with CUDA (csrc/window.h).
//
// Both ops stream over column chunks of the window (at::parallel_for over fixed-size chunks):
// window_gram widens a chunk of the k vectors and of each row to float64 and sums each dot in
// float64 on fixed SIMD lanes (vec.h), the chunks' partial sums added in chunk order;
// window_combine sums each output element over the rows in float64, in row order.  So the
// results do not depend on the number of threads or on the instruction set picked at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../window.h"
#include "vec.h"

namespace soo {

void check_window_gram_args(const at::Tensor& W, at::TensorList X, int64_t rows) {
  TORCH_CHECK(W.dim() == 2, "window_gram: W must be an [m, n] window, got shape ", W.sizes());
  TORCH_CHECK(W.is_contiguous(), "window_gram: W must be contiguous");
  TORCH_CHECK(static_cast<int64_t>(X.size()) <= kWindowMaxVectors,
              "window_gram: X must be a list of 0 to ", kWindowMaxVectors, " vectors");
  TORCH_CHECK(rows >= 0 && rows <= W.size(0), "window_gram: rows must be in [0, ", W.size(0),
              "], got ", rows);
  const at::ScalarType xt = X.empty() ? (W.scalar_type() == at::kDouble ? at::kDouble : at::kFloat)
                                      : X[0].scalar_type();
  TORCH_CHECK(xt == at::kFloat || xt == at::kDouble, "window_gram: X must be float32 or float64");
  TORCH_CHECK(W.scalar_type() == xt || (xt == at::kFloat && W.scalar_type() == at::kBFloat16),
              "window_gram: window dtype ", W.scalar_type(), " not allowed with ", xt, " vectors");
  for (const at::Tensor& x : X) {
    TORCH_CHECK(x.dim() == 1 && x.size(0) == W.size(1) && x.scalar_type() == xt &&
                    x.device() == W.device() && x.is_contiguous(),
                "window_gram: every X[j] must be a contiguous 1-D ", xt, " vector of length ",
                W.size(1), " on ", W.device());
  }
}

void check_window_combine_args(const at::Tensor& out, const at::Tensor& W, const at::Tensor& coef,
                               int64_t rows, const std::optional<at::Tensor>& base,
                               const std::optional<at::Tensor>& base_coef) {
  const at::ScalarType ot = out.scalar_type();
  TORCH_CHECK(out.dim() == 1 && (ot == at::kFloat || ot == at::kDouble) && out.is_contiguous(),
              "window_combine: out must be a contiguous 1-D float32 or float64 vector");
  TORCH_CHECK(W.dim() == 2 && W.is_contiguous() && W.size(1) == out.size(0),
              "window_combine: W must be a contiguous [m, ", out.size(0), "] window, got ",
              W.sizes());
  TORCH_CHECK(W.scalar_type() == ot || (ot == at::kFloat && W.scalar_type() == at::kBFloat16),
              "window_combine: window dtype ", W.scalar_type(), " not allowed with ", ot,
              " vectors");
  TORCH_CHECK(rows >= 0 && rows <= W.size(0), "window_combine: rows must be in [0, ", W.size(0),
              "], got ", rows);
  TORCH_CHECK(coef.dim() == 1 && coef.size(0) == W.size(0) && coef.scalar_type() == at::kDouble &&
                  coef.is_contiguous(),
              "window_combine: coef must be a contiguous [", W.size(0), "] float64 tensor");
  TORCH_CHECK(base.has_value() == base_coef.has_value(),
              "window_combine: base and base_coef go together");
  if (base.has_value()) {
    TORCH_CHECK(base->sizes() == out.sizes() && base->scalar_type() == ot && base->is_contiguous(),
                "window_combine: base must be a contiguous vector like out");
    TORCH_CHECK(base_coef->dim() == 0 && base_coef->scalar_type() == at::kDouble,
                "window_combine: base_coef must be a 0-dim float64 tensor");
    TORCH_CHECK(base->device() == out.device() && base_coef->device() == out.device(),
                "window_combine: all tensors must be on one device");
  }
  TORCH_CHECK(W.device() == out.device() && coef.device() == out.device(),
              "window_combine: all tensors must be on one device");
  if (out.numel() && W.numel()) {  // out may alias base, never the window
    const char* o = static_cast<const char*>(out.data_ptr());
    const char* w = static_cast<const char*>(W.data_ptr());
    const bool apart = o + out.nbytes() <= w || w + W.nbytes() <= o;
    TORCH_CHECK(apart, "window_combine: out must not overlap the window W");
  }
}

std::tuple<at::Tensor, at::Tensor> window_gram_outputs(const at::Tensor& W, int64_t k, bool full) {
  const auto opts = W.options().dtype(at::kDouble);
  const int64_t m = W.size(0);
  return {at::zeros({full ? m : 0, full ? m : 0}, opts), at::zeros({m, k}, opts)};
}

void window_gram_full(const at::Tensor& W, int64_t rows, at::Tensor& G) {
  if (rows == 0 || W.size(1) == 0) return;
  // chunks of at most ~32 MB of float64: the widened copy stays small whatever n is
  const int64_t cols = std::max<int64_t>(1024, (int64_t{1} << 22) / rows);
  const at::Tensor Wr = W.narrow(0, 0, rows);
  at::Tensor acc = G.narrow(0, 0, rows).narrow(1, 0, rows);
  for (int64_t lo = 0; lo < W.size(1); lo += cols) {
    const at::Tensor chunk = Wr.narrow(1, lo, std::min(cols, W.size(1) - lo)).to(at::kDouble);
    acc.addmm_(chunk, chunk.t());
  }
  acc.copy_(acc.triu() + acc.triu(1).t());  // the upper triangle, mirrored
}

namespace {

using cpu::lane_sum;
using cpu::load;
using cpu::Vec;

constexpr int64_t kCols = 2048;  // columns per work item (dots)
constexpr int64_t kTile = 512;   // columns per tile (combine)

template <typename T>
SOO_ALWAYS_INLINE void widen(const T* p, int64_t len, double* out) {
  for (int64_t i = 0; i < len; ++i) out[i] = static_cast<double>(static_cast<float>(p[i]));
}
SOO_ALWAYS_INLINE void widen(const double* p, int64_t len, double* out) {
  std::copy(p, p + len, out);
}

// Vec<double>::width (4) consecutive elements widened to double (exactly).
typedef float f32x4 __attribute__((vector_size(16)));
typedef uint16_t u16x4 __attribute__((vector_size(8)));
typedef uint32_t u32x4 __attribute__((vector_size(16)));
SOO_ALWAYS_INLINE Vec<double>::type load_wide(const double* p) { return load<double>(p); }
SOO_ALWAYS_INLINE Vec<double>::type load_wide(const float* p) {
  f32x4 v;
  std::memcpy(&v, p, sizeof v);
  return __builtin_convertvector(v, Vec<double>::type);
}
SOO_ALWAYS_INLINE Vec<double>::type load_wide(const c10::BFloat16* p) {
  u16x4 bits;
  std::memcpy(&bits, p, sizeof bits);
  const u32x4 widened = __builtin_convertvector(bits, u32x4) << 16;  // bf16: fp32's top half
  f32x4 v;
  std::memcpy(&v, &widened, sizeof v);
  return __builtin_convertvector(v, Vec<double>::type);
}

SOO_ALWAYS_INLINE double wide(double x) { return x; }
template <typename T>
SOO_ALWAYS_INLINE double wide(T x) { return static_cast<double>(static_cast<float>(x)); }

// p += a0 * b0 and q += a1 * b1 on Vec<double>::width elements (a widened exactly).
template <bool shared_row, typename T>
SOO_ALWAYS_INLINE void add_products(const T* a0, const T* a1, const double* b0, const double* b1,
                                    Vec<double>::type& p, Vec<double>::type& q) {
  const Vec<double>::type x0 = load_wide(a0);
  p += x0 * load<double>(b0);
  q += (shared_row ? x0 : load_wide(a1)) * load<double>(b1);
}

// Two dots at once, sum_i a0[i] b0[i] and sum_i a1[i] b1[i] (a in storage type T, b float64):
// each with four accumulators (four add chains) summed in a fixed order, the tail in element
// order.  Eight independent chains keep the adder busy where one dot's four wait on the add
// latency.  `shared_row`: a0 == a1, loaded and widened once.
template <bool shared_row, typename T>
SOO_ALWAYS_INLINE void dot_pair(const T* a0, const T* a1, const double* b0, const double* b1,
                                int64_t len, double* out0, double* out1) {
  using Vt = Vec<double>::type;
  constexpr int W = Vec<double>::width;
  Vt p0{}, p1{}, p2{}, p3{}, q0{}, q1{}, q2{}, q3{};
  int64_t i = 0;
  for (; i + 4 * W <= len; i += 4 * W) {
    add_products<shared_row>(a0 + i, a1 + i, b0 + i, b1 + i, p0, q0);
    add_products<shared_row>(a0 + i + W, a1 + i + W, b0 + i + W, b1 + i + W, p1, q1);
    add_products<shared_row>(a0 + i + 2 * W, a1 + i + 2 * W, b0 + i + 2 * W, b1 + i + 2 * W,
                             p2, q2);
    add_products<shared_row>(a0 + i + 3 * W, a1 + i + 3 * W, b0 + i + 3 * W, b1 + i + 3 * W,
                             p3, q3);
  }
  for (; i + W <= len; i += W) add_products<shared_row>(a0 + i, a1 + i, b0 + i, b1 + i, p0, q0);
  double s0 = lane_sum((p0 + p1) + (p2 + p3)), s1 = lane_sum((q0 + q1) + (q2 + q3));
  for (; i < len; ++i) {
    s0 += wide(a0[i]) * b0[i];
    s1 += wide(a1[i]) * b1[i];
  }
  *out0 = s0;
  *out1 = s1;
}

// One dot alone (same sums as one half of dot_pair).
template <typename T>
SOO_ALWAYS_INLINE double dot(const T* a, const double* b, int64_t len) {
  using Vt = Vec<double>::type;
  constexpr int W = Vec<double>::width;
  Vt a0{}, a1{}, a2{}, a3{};
  int64_t i = 0;
  for (; i + 4 * W <= len; i += 4 * W) {
    a0 += load_wide(a + i) * load<double>(b + i);
    a1 += load_wide(a + i + W) * load<double>(b + i + W);
    a2 += load_wide(a + i + 2 * W) * load<double>(b + i + 2 * W);
    a3 += load_wide(a + i + 3 * W) * load<double>(b + i + 3 * W);
  }
  for (; i + W <= len; i += W) a0 += load_wide(a + i) * load<double>(b + i);
  double total = lane_sum((a0 + a1) + (a2 + a3));
  for (; i < len; ++i) total += wide(a[i]) * b[i];
  return total;
}

// The rows x k dots of one column chunk, in pairs: two vectors of one row while two remain,
// then an odd last vector against two rows at a time.
template <typename TW, typename TX>
SOO_ALWAYS_INLINE void dots_chunk(const TW* W, int64_t n, const TX* const* X, int64_t k,
                                  int64_t rows, int64_t lo, int64_t hi, double* buf,
                                  double* out) {
  const int64_t len = hi - lo, paired = k / 2 * 2;
  for (int64_t j = 0; j < k; ++j) widen(X[j] + lo, len, buf + j * kCols);
  for (int64_t i = 0; i < rows; ++i) {
    const TW* row = W + i * n + lo;
    for (int64_t j = 0; j < paired; j += 2)
      dot_pair<true>(row, row, buf + j * kCols, buf + (j + 1) * kCols, len, out + i * k + j,
                     out + i * k + j + 1);
  }
  if (paired == k) return;
  const double* last = buf + paired * kCols;
  int64_t i = 0;
  for (; i + 2 <= rows; i += 2)
    dot_pair<false>(W + i * n + lo, W + (i + 1) * n + lo, last, last, len, out + i * k + paired,
                    out + (i + 1) * k + paired);
  if (i < rows) out[i * k + paired] = dot(W + i * n + lo, last, len);
}

// Rows are added four at a time (their four products summed first, then added to the
// accumulator), the last rows one at a time: a fixed order.
template <typename TW, typename TO>
SOO_ALWAYS_INLINE void combine_chunk(TO* out, const TW* W, int64_t n, const double* coef,
                                     int64_t rows, const TO* base, double base_coef, int64_t lo,
                                     int64_t hi) {
  using Vt = Vec<double>::type;
  constexpr int VW = Vec<double>::width;
  alignas(32) double acc[kTile];
  for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
    const int64_t len = std::min(kTile, hi - t0), vlen = len / VW * VW;
    std::fill(acc, acc + len, 0.0);
    int64_t i = 0;
    for (; i + 4 <= rows; i += 4) {
      const TW* r0 = W + i * n + t0;
      const TW *r1 = r0 + n, *r2 = r1 + n, *r3 = r2 + n;
      const double c0 = coef[i], c1 = coef[i + 1], c2 = coef[i + 2], c3 = coef[i + 3];
      for (int64_t e = 0; e < vlen; e += VW) {
        Vt a = load<double>(acc + e) + ((c0 * load_wide(r0 + e) + c1 * load_wide(r1 + e)) +
                                        (c2 * load_wide(r2 + e) + c3 * load_wide(r3 + e)));
        std::memcpy(acc + e, &a, sizeof a);
      }
      for (int64_t e = vlen; e < len; ++e)
        acc[e] += (c0 * wide(r0[e]) + c1 * wide(r1[e])) + (c2 * wide(r2[e]) + c3 * wide(r3[e]));
    }
    for (; i < rows; ++i) {
      const TW* r = W + i * n + t0;
      const double c = coef[i];
      for (int64_t e = 0; e < vlen; e += VW) {
        Vt a = load<double>(acc + e) + c * load_wide(r + e);
        std::memcpy(acc + e, &a, sizeof a);
      }
      for (int64_t e = vlen; e < len; ++e) acc[e] += c * wide(r[e]);
    }
    for (int64_t e = 0; e < len; ++e) {
      const double total = base ? acc[e] + base_coef * static_cast<double>(base[t0 + e]) : acc[e];
      out[t0 + e] = static_cast<TO>(total);
    }
  }
}

// The chunk kernels compiled for the baseline ISA and for AVX2 (same results, see vec.h).
template <typename TW, typename TX>
void dots_base(const TW* W, int64_t n, const TX* const* X, int64_t k, int64_t rows, int64_t lo,
               int64_t hi, double* buf, double* out) {
  dots_chunk(W, n, X, k, rows, lo, hi, buf, out);
}
template <typename TW, typename TO>
void combine_base(TO* out, const TW* W, int64_t n, const double* coef, int64_t rows,
                  const TO* base, double base_coef, int64_t lo, int64_t hi) {
  combine_chunk(out, W, n, coef, rows, base, base_coef, lo, hi);
}
#if SOO_HAVE_AVX2_PATH
template <typename TW, typename TX>
SOO_TARGET_AVX2 void dots_avx2(const TW* W, int64_t n, const TX* const* X, int64_t k,
                               int64_t rows, int64_t lo, int64_t hi, double* buf, double* out) {
  dots_chunk(W, n, X, k, rows, lo, hi, buf, out);
}
template <typename TW, typename TO>
SOO_TARGET_AVX2 void combine_avx2(TO* out, const TW* W, int64_t n, const double* coef,
                                  int64_t rows, const TO* base, double base_coef, int64_t lo,
                                  int64_t hi) {
  combine_chunk(out, W, n, coef, rows, base, base_coef, lo, hi);
}
#endif

std::tuple<at::Tensor, at::Tensor> window_gram_cpu(const at::Tensor& W, at::TensorList X,
                                                   int64_t rows, bool full) {
  check_window_gram_args(W, X, rows);
  const int64_t n = W.size(1), k = static_cast<int64_t>(X.size());
  at::Tensor G, D;
  std::tie(G, D) = window_gram_outputs(W, k, full);
  if (full) window_gram_full(W, rows, G);
  if (k == 0 || rows == 0 || n == 0) return {G, D};
  const int64_t n_chunks = (n + kCols - 1) / kCols;
  dispatch_window(W.scalar_type(), [&](auto tw, auto tx) {
    using TW = decltype(tw);
    using TX = decltype(tx);
    auto fn = dots_base<TW, TX>;
#if SOO_HAVE_AVX2_PATH
    if (cpu::cpu_has_avx2()) fn = dots_avx2<TW, TX>;
#endif
    const TX* xp[kWindowMaxVectors];
    for (int64_t j = 0; j < k; ++j) xp[j] = X[j].data_ptr<TX>();
    const TW* wp = static_cast<const TW*>(W.data_ptr());
    std::vector<double> partial(n_chunks * rows * k);
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<double> buf(k * kCols);
      for (int64_t ch = c0; ch < c1; ++ch)
        fn(wp, n, xp, k, rows, ch * kCols, std::min(n, (ch + 1) * kCols), buf.data(),
           partial.data() + ch * rows * k);
    });
    double* dp = D.data_ptr<double>();  // [m, k]: rows beyond `rows` stay zero
    for (int64_t ch = 0; ch < n_chunks; ++ch)  // chunk order: independent of the thread count
      for (int64_t e = 0; e < rows * k; ++e) dp[e] += partial[ch * rows * k + e];
  });
  return {G, D};
}

void window_combine_cpu(at::Tensor& out, const at::Tensor& W, const at::Tensor& coef,
                        int64_t rows, const std::optional<at::Tensor>& base,
                        const std::optional<at::Tensor>& base_coef) {
  check_window_combine_args(out, W, coef, rows, base, base_coef);
  const int64_t n = out.size(0);
  if (n == 0) return;
  const double bc = base.has_value() ? *base_coef->data_ptr<double>() : 0.0;
  dispatch_window(W.scalar_type(), [&](auto tw, auto to) {
    using TW = decltype(tw);
    using TO = decltype(to);
    auto fn = combine_base<TW, TO>;
#if SOO_HAVE_AVX2_PATH
    if (cpu::cpu_has_avx2()) fn = combine_avx2<TW, TO>;
#endif
    TO* op = out.data_ptr<TO>();
    const TW* wp = static_cast<const TW*>(W.data_ptr());
    const TO* bp = base.has_value() ? base->data_ptr<TO>() : nullptr;
    const double* cp = coef.data_ptr<double>();
    at::parallel_for(0, (n + kCols - 1) / kCols, 1, [&](int64_t c0, int64_t c1) {
      fn(op, wp, n, cp, rows, bp, bc, c0 * kCols, std::min(n, c1 * kCols));
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(soo, CPU, m) {
  m.impl("window_gram", &window_gram_cpu);
  m.impl("window_combine", &window_combine_cpu);
}

}  // namespace soo
