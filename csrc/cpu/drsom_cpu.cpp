// CPU kernels of the DRSOM ops (soo::drsom_perturb, drsom_reduce, drsom_update,
// drsom_subproblem) and the argument checks shared with CUDA.
//
// Work is cut into fixed-size chunks (at::parallel_for); the reduction accumulates in double
// (also for float32 vectors), its partial sums are combined in chunk order and every sum inside
// a chunk runs on fixed SIMD lanes (vec.h), so the results do not depend on the number of
// threads or on the instruction set picked at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../drsom.h"
#include "vec.h"

namespace soo {
namespace {

using cpu::lane_sum;
using cpu::load;
using cpu::store;
using cpu::Vec;

constexpr int64_t kChunk = 16384;  // elements per work item (a multiple of every SIMD width)
constexpr int64_t kTile = 256;     // elements per L1 tile inside a chunk (reduce)

// ---- perturb: elements [lo, hi) ----------------------------------------------------------------
template <typename T, bool kSave>
SOO_ALWAYS_INLINE void perturb_chunk(T* x, T* x0, const T* v, T t, int64_t lo, int64_t hi) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  int64_t i = lo;
  for (; i + W <= hi; i += W) {
    V base;
    if constexpr (kSave) {
      base = load<T>(x + i);
      store(x0 + i, base);
    } else {
      base = load<T>(x0 + i);
    }
    store(x + i, base + t * load<T>(v + i));
  }
  for (; i < hi; ++i) {
    T base;
    if constexpr (kSave) {
      base = x[i];
      x0[i] = base;
    } else {
      base = x0[i];
    }
    x[i] = base + t * v[i];
  }
}

// ---- update: elements [lo, hi); p may alias one of the V[j] (all reads of a block first) --------
template <typename T>
SOO_ALWAYS_INLINE void update_chunk(T* x, T* p, const T* const* V, const T* alpha, int64_t k,
                                    int64_t lo, int64_t hi) {
  using Vt = typename Vec<T>::type;
  constexpr int W = Vec<T>::width;
  int64_t i = lo;
  for (; i + W <= hi; i += W) {
    Vt step = alpha[0] * load<T>(V[0] + i);
    for (int64_t j = 1; j < k; ++j) step += alpha[j] * load<T>(V[j] + i);
    store(p + i, step);
    store(x + i, load<T>(x + i) + step);
  }
  for (; i < hi; ++i) {
    T step = alpha[0] * V[0][i];
    for (int64_t j = 1; j < k; ++j) step += alpha[j] * V[j][i];
    p[i] = step;
    x[i] = x[i] + step;
  }
}

// ---- reduce: elements [lo, hi) -> out[ndots] -----------------------------------------------------
// Sums are accumulated in double also for float inputs (float32 dot products of random-sign
// terms lose too many digits over millions of elements); the result is rounded once at the end.
// A tile of float32 input widened to double once per tile (an auto-vectorised loop: GCC lowered
// __builtin_convertvector of 4 floats to 2-lane conversions and shuffles, which made float32
// reduces 2x slower than float64); float64 input is used in place.
template <typename T>
SOO_ALWAYS_INLINE const double* widen_tile(const T* p, int64_t len, double* buf) {
  if constexpr (std::is_same_v<T, double>) {
    return p;
  } else {
    for (int64_t i = 0; i < len; ++i) buf[i] = static_cast<double>(p[i]);
    return buf;
  }
}

// Each dot keeps kAcc independent accumulators (one SIMD vector each): without FMA (see vec.h)
// one accumulator is an add-latency chain, 4 cycles a vector; four chains keep the adder busy.
// They are summed in a fixed order at the end.  Accumulators live in `acc`, updated tile by tile
// so that every input element is read from memory once and re-read from L1 only.
constexpr int kAcc = 4;

SOO_ALWAYS_INLINE void dot_tile(Vec<double>::type* acc, const double* a, const double* b,
                                int64_t len) {
  using Vt = Vec<double>::type;
  constexpr int W = Vec<double>::width;
  Vt a0 = acc[0], a1 = acc[1], a2 = acc[2], a3 = acc[3];
  int64_t i = 0;
  for (; i + kAcc * W <= len; i += kAcc * W) {
    a0 += load<double>(a + i) * load<double>(b + i);
    a1 += load<double>(a + i + W) * load<double>(b + i + W);
    a2 += load<double>(a + i + 2 * W) * load<double>(b + i + 2 * W);
    a3 += load<double>(a + i + 3 * W) * load<double>(b + i + 3 * W);
  }
  for (; i < len; i += W) a0 += load<double>(a + i) * load<double>(b + i);
  acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

template <typename T, bool kGram>
SOO_ALWAYS_INLINE void reduce_chunk(const T* gp, const T* g, const T* const* V, int64_t k,
                                    int64_t lo, int64_t hi, double* out) {
  using Vt = Vec<double>::type;
  constexpr int W = Vec<double>::width;
  constexpr int kMaxDots = 3 * kDrsomMaxDirs + kDrsomMaxDirs * (kDrsomMaxDirs - 1) / 2 + 1;
  const int64_t nd = drsom_num_dots(k, kGram);
  Vt acc[kMaxDots][kAcc];
  for (int64_t d = 0; d < nd; ++d)
    for (int l = 0; l < kAcc; ++l) acc[d][l] = Vt{};
  alignas(32) double diff[kTile];
  constexpr int64_t kWide = std::is_same_v<T, double> ? 1 : kTile;  // float64: unused
  alignas(32) double g_wide[kWide];
  alignas(32) double v_wide[kDrsomMaxDirs][kWide];
  const double* v[kDrsomMaxDirs];
  const int64_t vec_hi = lo + (hi - lo) / W * W;
  for (int64_t t0 = lo; t0 < vec_hi; t0 += kTile) {
    const int64_t len = std::min(kTile, vec_hi - t0);
    const double* gw = widen_tile(g + t0, len, g_wide);
    for (int64_t i = 0; i < len; ++i) diff[i] = static_cast<double>(gp[t0 + i]) - gw[i];
    for (int64_t j = 0; j < k; ++j)
      v[j] = widen_tile(V[j] + t0, len, v_wide[j]);
    int64_t d = 0;
    for (int64_t j = 0; j < k; ++j, ++d) dot_tile(acc[d], diff, v[j], len);
    if constexpr (kGram) {
      for (int64_t a = 0; a < k; ++a)
        for (int64_t b = a; b < k; ++b, ++d) dot_tile(acc[d], v[a], v[b], len);
      for (int64_t j = 0; j < k; ++j, ++d) dot_tile(acc[d], gw, v[j], len);
    }
  }
  for (int64_t d = 0; d < nd; ++d)
    out[d] = lane_sum((acc[d][0] + acc[d][1]) + (acc[d][2] + acc[d][3]));
  for (int64_t i = vec_hi; i < hi; ++i) {  // the tail of the last chunk, in a fixed order
    const double di = double(gp[i]) - double(g[i]);
    int64_t d = 0;
    for (int64_t j = 0; j < k; ++j, ++d) out[d] += di * double(V[j][i]);
    if constexpr (kGram) {
      for (int64_t a = 0; a < k; ++a)
        for (int64_t b = a; b < k; ++b, ++d) out[d] += double(V[a][i]) * double(V[b][i]);
      for (int64_t j = 0; j < k; ++j, ++d) out[d] += double(g[i]) * double(V[j][i]);
    }
  }
}

// The chunk kernels compiled for the baseline ISA and for AVX2 (same results, see vec.h).
template <typename T, bool kSave>
void perturb_base(T* x, T* x0, const T* v, T t, int64_t lo, int64_t hi) {
  perturb_chunk<T, kSave>(x, x0, v, t, lo, hi);
}
template <typename T>
void update_base(T* x, T* p, const T* const* V, const T* alpha, int64_t k, int64_t lo,
                 int64_t hi) {
  update_chunk<T>(x, p, V, alpha, k, lo, hi);
}
template <typename T, bool kGram>
void reduce_base(const T* gp, const T* g, const T* const* V, int64_t k, int64_t lo, int64_t hi,
                 double* out) {
  reduce_chunk<T, kGram>(gp, g, V, k, lo, hi, out);
}
#if SOO_HAVE_AVX2_PATH
template <typename T, bool kSave>
SOO_TARGET_AVX2 void perturb_avx2(T* x, T* x0, const T* v, T t, int64_t lo, int64_t hi) {
  perturb_chunk<T, kSave>(x, x0, v, t, lo, hi);
}
template <typename T>
SOO_TARGET_AVX2 void update_avx2(T* x, T* p, const T* const* V, const T* alpha, int64_t k,
                                 int64_t lo, int64_t hi) {
  update_chunk<T>(x, p, V, alpha, k, lo, hi);
}
template <typename T, bool kGram>
SOO_TARGET_AVX2 void reduce_avx2(const T* gp, const T* g, const T* const* V, int64_t k,
                                 int64_t lo, int64_t hi, double* out) {
  reduce_chunk<T, kGram>(gp, g, V, k, lo, hi, out);
}
#endif

int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

bool is_float(const at::Tensor& a) {
  return a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble;
}

void check_vector(const char* op, const char* name, const at::Tensor& a, const at::Tensor& ref) {
  TORCH_CHECK(a.dim() == 1, op, ": ", name, " must be 1-D, got shape ", a.sizes());
  TORCH_CHECK(a.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              a.scalar_type(), ", expected ", ref.scalar_type(), " (no dtype mix)");
  TORCH_CHECK(a.device() == ref.device(), op, ": ", name, " is on ", a.device(),
              ", expected ", ref.device(), " (all tensors on one device)");
  TORCH_CHECK(a.size(0) == ref.size(0), op, ": ", name, " has length ", a.size(0),
              ", expected ", ref.size(0));
  TORCH_CHECK(a.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_directions(const char* op, at::TensorList V, const at::Tensor& ref) {
  TORCH_CHECK(!V.empty() && static_cast<int64_t>(V.size()) <= kDrsomMaxDirs, op,
              ": V must hold 1 to ", kDrsomMaxDirs, " directions, got ", V.size());
  for (const at::Tensor& vj : V) check_vector(op, "every V[j]", vj, ref);
}

void check_scalar_tensor(const char* op, const char* name, const at::Tensor& a,
                         const at::Tensor& ref) {
  TORCH_CHECK(a.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              a.scalar_type(), ", expected ", ref.scalar_type(), " (no dtype mix)");
  TORCH_CHECK(a.device() == ref.device(), op, ": ", name, " is on ", a.device(), ", expected ",
              ref.device(), " (all tensors on one device)");
}

}  // namespace

void check_drsom_perturb_args(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& v,
                              const at::Tensor& t) {
  TORCH_CHECK(x.dim() == 1, "drsom_perturb: x must be 1-D, got shape ", x.sizes());
  TORCH_CHECK(is_float(x), "drsom_perturb: x must be float32 or float64, got ", x.scalar_type());
  check_vector("drsom_perturb", "x", x, x);
  check_vector("drsom_perturb", "x0", x0, x);
  check_vector("drsom_perturb", "v", v, x);
  TORCH_CHECK(t.dim() == 0, "drsom_perturb: t must be a 0-dim tensor, got shape ", t.sizes());
  check_scalar_tensor("drsom_perturb", "t", t, x);
  TORCH_CHECK(x.numel() == 0 || x.data_ptr() != x0.data_ptr(),
              "drsom_perturb: x and x0 must be different tensors");
}

void check_drsom_reduce_args(const at::Tensor& g_pert, const at::Tensor& g, at::TensorList V,
                             const at::Tensor& t) {
  TORCH_CHECK(g.dim() == 1, "drsom_reduce: g must be 1-D, got shape ", g.sizes());
  TORCH_CHECK(is_float(g), "drsom_reduce: g must be float32 or float64, got ", g.scalar_type());
  check_vector("drsom_reduce", "g", g, g);
  check_vector("drsom_reduce", "g_pert", g_pert, g);
  check_directions("drsom_reduce", V, g);
  TORCH_CHECK(t.dim() == 0, "drsom_reduce: t must be a 0-dim tensor, got shape ", t.sizes());
  check_scalar_tensor("drsom_reduce", "t", t, g);
}

void check_drsom_update_args(const at::Tensor& x, const at::Tensor& p, at::TensorList V,
                             const at::Tensor& alpha) {
  TORCH_CHECK(x.dim() == 1, "drsom_update: x must be 1-D, got shape ", x.sizes());
  TORCH_CHECK(is_float(x), "drsom_update: x must be float32 or float64, got ", x.scalar_type());
  check_vector("drsom_update", "x", x, x);
  check_vector("drsom_update", "p", p, x);
  check_directions("drsom_update", V, x);
  TORCH_CHECK(alpha.dim() == 1 && alpha.size(0) == static_cast<int64_t>(V.size()),
              "drsom_update: alpha must be 1-D with len(V) = ", V.size(), " entries, got shape ",
              alpha.sizes());
  check_scalar_tensor("drsom_update", "alpha", alpha, x);
  TORCH_CHECK(alpha.is_contiguous(), "drsom_update: alpha must be contiguous");
  TORCH_CHECK(x.numel() == 0 || x.data_ptr() != p.data_ptr(),
              "drsom_update: x and p must be different tensors");
}

void check_drsom_subproblem_args(const at::Tensor& Q, const at::Tensor& G, const at::Tensor& c,
                                 double gamma, double max_length, double gamma_increase) {
  TORCH_CHECK(Q.dim() == 2 && Q.size(0) == Q.size(1) && Q.size(0) >= 1 &&
                  Q.size(0) <= kDrsomMaxDirs,
              "drsom_subproblem: Q must be k x k with 1 <= k <= ", kDrsomMaxDirs,
              ", got shape ", Q.sizes());
  TORCH_CHECK(is_float(Q), "drsom_subproblem: Q must be float32 or float64, got ",
              Q.scalar_type());
  TORCH_CHECK(G.sizes() == Q.sizes(), "drsom_subproblem: G must have Q's shape ", Q.sizes(),
              ", got ", G.sizes());
  TORCH_CHECK(c.dim() == 1 && c.size(0) == Q.size(0), "drsom_subproblem: c must be 1-D with ",
              Q.size(0), " entries, got shape ", c.sizes());
  check_scalar_tensor("drsom_subproblem", "G", G, Q);
  check_scalar_tensor("drsom_subproblem", "c", c, Q);
  TORCH_CHECK(std::isfinite(gamma) && gamma >= 0,
              "drsom_subproblem: gamma must be finite and >= 0, got ", gamma);
  TORCH_CHECK(max_length >= 0, "drsom_subproblem: max_length must be >= 0 (inf: no limit), got ",
              max_length);
  TORCH_CHECK(std::isfinite(gamma_increase) && gamma_increase > 1,
              "drsom_subproblem: gamma_increase must be finite and > 1, got ", gamma_increase);
}

double drsom_subproblem_reg(at::ScalarType dtype) {
  return std::sqrt(dtype == at::kFloat ? static_cast<double>(std::numeric_limits<float>::epsilon())
                                       : std::numeric_limits<double>::epsilon());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> drsom_reduce_outputs(const at::Tensor& g,
                                                                    int64_t k, bool with_gram) {
  return {at::empty({k}, g.options()), at::empty({with_gram ? k : 0, with_gram ? k : 0}, g.options()),
          at::empty({with_gram ? k : 0}, g.options())};
}

namespace {

void drsom_perturb_cpu(at::Tensor& x, at::Tensor& x0, const at::Tensor& v, const at::Tensor& t,
                       bool save) {
  check_drsom_perturb_args(x, x0, v, t);
  const int64_t n = x.size(0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "drsom_perturb_cpu", [&] {
    auto fn = save ? perturb_base<scalar_t, true> : perturb_base<scalar_t, false>;
#if SOO_HAVE_AVX2_PATH
    if (cpu::cpu_has_avx2()) fn = save ? perturb_avx2<scalar_t, true> : perturb_avx2<scalar_t, false>;
#endif
    const scalar_t tv = *t.data_ptr<scalar_t>();
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* x0p = x0.data_ptr<scalar_t>();
    const scalar_t* vp = v.data_ptr<scalar_t>();
    at::parallel_for(0, num_chunks(n), 1, [&](int64_t c0, int64_t c1) {
      fn(xp, x0p, vp, tv, c0 * kChunk, std::min(n, c1 * kChunk));
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> drsom_reduce_cpu(const at::Tensor& g_pert,
                                                                const at::Tensor& g,
                                                                at::TensorList V,
                                                                const at::Tensor& t,
                                                                bool with_gram) {
  check_drsom_reduce_args(g_pert, g, V, t);
  const int64_t n = g.size(0), k = static_cast<int64_t>(V.size());
  at::Tensor q, G, c;
  std::tie(q, G, c) = drsom_reduce_outputs(g, k, with_gram);
  const int64_t nd = drsom_num_dots(k, with_gram), n_chunks = num_chunks(n);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "drsom_reduce_cpu", [&] {
    auto fn = with_gram ? reduce_base<scalar_t, true> : reduce_base<scalar_t, false>;
#if SOO_HAVE_AVX2_PATH
    if (cpu::cpu_has_avx2()) fn = with_gram ? reduce_avx2<scalar_t, true> : reduce_avx2<scalar_t, false>;
#endif
    const scalar_t* vp[kDrsomMaxDirs];
    for (int64_t j = 0; j < k; ++j) vp[j] = V[j].data_ptr<scalar_t>();
    const scalar_t* gpp = g_pert.data_ptr<scalar_t>();
    const scalar_t* gptr = g.data_ptr<scalar_t>();
    std::vector<double> partial(n_chunks * nd);
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t ch = c0; ch < c1; ++ch)
        fn(gpp, gptr, vp, k, ch * kChunk, std::min(n, (ch + 1) * kChunk),
           partial.data() + ch * nd);
    });
    std::vector<double> dots(nd, 0.0);
    for (int64_t ch = 0; ch < n_chunks; ++ch)  // chunk order: independent of the thread count
      for (int64_t d = 0; d < nd; ++d) dots[d] += partial[ch * nd + d];
    const double tv = *t.data_ptr<scalar_t>();
    scalar_t* qp = q.data_ptr<scalar_t>();
    for (int64_t j = 0; j < k; ++j) qp[j] = static_cast<scalar_t>(dots[j] / tv);
    if (with_gram) {
      scalar_t* Gp = G.data_ptr<scalar_t>();
      int64_t d = k;
      for (int64_t a = 0; a < k; ++a)
        for (int64_t b = a; b < k; ++b, ++d) Gp[a * k + b] = Gp[b * k + a] = static_cast<scalar_t>(dots[d]);
      scalar_t* cp = c.data_ptr<scalar_t>();
      for (int64_t j = 0; j < k; ++j, ++d) cp[j] = static_cast<scalar_t>(dots[d]);
    }
  });
  return {q, G, c};
}

void drsom_update_cpu(at::Tensor& x, at::Tensor& p, at::TensorList V, const at::Tensor& alpha) {
  check_drsom_update_args(x, p, V, alpha);
  const int64_t n = x.size(0), k = static_cast<int64_t>(V.size());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "drsom_update_cpu", [&] {
    auto fn = update_base<scalar_t>;
#if SOO_HAVE_AVX2_PATH
    if (cpu::cpu_has_avx2()) fn = update_avx2<scalar_t>;
#endif
    const scalar_t* vp[kDrsomMaxDirs];
    for (int64_t j = 0; j < k; ++j) vp[j] = V[j].data_ptr<scalar_t>();
    scalar_t a[kDrsomMaxDirs];
    for (int64_t j = 0; j < k; ++j) a[j] = alpha.data_ptr<scalar_t>()[j];
    scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* pp = p.data_ptr<scalar_t>();
    at::parallel_for(0, num_chunks(n), 1, [&](int64_t c0, int64_t c1) {
      fn(xp, pp, vp, a, k, c0 * kChunk, std::min(n, c1 * kChunk));
    });
  });
}

at::Tensor drsom_subproblem_cpu(const at::Tensor& Q, const at::Tensor& G, const at::Tensor& c,
                                double gamma, double max_length, double gamma_increase) {
  check_drsom_subproblem_args(Q, G, c, gamma, max_length, gamma_increase);
  const int k = static_cast<int>(Q.size(0)), m = k + kDrsomSubproblemExtra;
  at::Tensor out = at::empty({m}, Q.options());
  AT_DISPATCH_FLOATING_TYPES(Q.scalar_type(), "drsom_subproblem_cpu", [&] {
    constexpr int K = static_cast<int>(kDrsomMaxDirs);
    double q[K * K], g[K * K], cv[K], o[K + kDrsomSubproblemExtra],
        ws[kDrsomSubproblemWorkspace];
    const auto Qa = Q.accessor<scalar_t, 2>(), Ga = G.accessor<scalar_t, 2>();
    const auto ca = c.accessor<scalar_t, 1>();
    for (int i = 0; i < k; ++i) {
      cv[i] = ca[i];
      for (int j = 0; j < k; ++j) {
        q[i * k + j] = Qa[i][j];
        g[i * k + j] = Ga[i][j];
      }
    }
    drsom_subproblem_solve(q, g, cv, k, gamma, max_length, gamma_increase,
                           drsom_subproblem_reg(Q.scalar_type()), ws, o);
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int i = 0; i < m; ++i) op[i] = static_cast<scalar_t>(o[i]);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(soo, CPU, m) {
  m.impl("drsom_perturb", &drsom_perturb_cpu);
  m.impl("drsom_reduce", &drsom_reduce_cpu);
  m.impl("drsom_update", &drsom_update_cpu);
  m.impl("drsom_subproblem", &drsom_subproblem_cpu);
}

}  // namespace soo
