// CPU kernel of soo::lbfgs_direction: two parallel passes over the history (at::parallel_for).
//
// Work is cut into fixed-size chunks whose partial sums are combined in chunk order, and every
// sum inside a chunk runs on fixed SIMD lanes (vec.h), so results do not depend on the number of
// threads or on the instruction set picked at run time (bit-identical reruns and resumes).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../lbfgs_direction.h"
#include "vec.h"

namespace soo {
namespace {

using cpu::lane_max;
using cpu::lane_sum;
using cpu::load;
using cpu::store;
using cpu::scalar;
using cpu::Vec;

constexpr int64_t kChunk = 16384;  // elements per work item: long runs per row, tile fits in L2

// Pass 1 on elements [lo, hi): per history row k, s_k.g and y_k.g, and with kGram the Gram
// entries s_k.y_new, s_new.y_k, y_k.y_new, all in one sweep over the row.  `out` is [dot][count].
template <typename acc_t, typename hist_t, bool kGram>
SOO_ALWAYS_INLINE void pass1_chunk(const hist_t* S, const hist_t* Y, const acc_t* g,
                                   const int64_t* slot, int64_t count, int64_t n, int64_t newest,
                                   int64_t lo, int64_t hi, acc_t* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::width;
  const hist_t* s_new = S + newest * n;
  const hist_t* y_new = Y + newest * n;
  for (int64_t k = 0; k < count; ++k) {
    const hist_t* s = S + slot[k] * n;
    const hist_t* y = Y + slot[k] * n;
    V sg{}, yg{}, sy{}, ny{}, yy{};
    int64_t i = lo;
    for (; i + W <= hi; i += W) {
      const V vs = load<acc_t>(s + i), vy = load<acc_t>(y + i), vg = load<acc_t>(g + i);
      sg += vs * vg;
      yg += vy * vg;
      if constexpr (kGram) {
        const V yn = load<acc_t>(y_new + i), sn = load<acc_t>(s_new + i);
        sy += vs * yn;
        ny += sn * vy;
        yy += vy * yn;
      }
    }
    acc_t t_sg = lane_sum(sg), t_yg = lane_sum(yg);
    acc_t t_sy = lane_sum(sy), t_ny = lane_sum(ny), t_yy = lane_sum(yy);
    for (; i < hi; ++i) {
      const acc_t vs = scalar(s[i]), vy = scalar(y[i]);
      t_sg += vs * g[i];
      t_yg += vy * g[i];
      if constexpr (kGram) {
        t_sy += vs * scalar(y_new[i]);
        t_ny += scalar(s_new[i]) * vy;
        t_yy += vy * scalar(y_new[i]);
      }
    }
    out[k] = t_sg;
    out[count + k] = t_yg;
    if constexpr (kGram) {
      out[2 * count + k] = t_sy;
      out[3 * count + k] = t_ny;
      out[4 * count + k] = t_yy;
    }
  }
}

// Pass 2 on elements [lo, lo + len): d = -(gamma g + sum coef_y y_k + sum coef_s s_k) built in
// `tile` one row at a time, then written out with the chunk's g.d and max|d|.
template <typename acc_t, typename hist_t>
SOO_ALWAYS_INLINE void pass2_chunk(const hist_t* S, const hist_t* Y, const acc_t* g,
                                   const acc_t* coef, const int64_t* slot, int64_t count,
                                   int64_t n, int64_t lo, int64_t len, acc_t* tile, acc_t* d,
                                   acc_t* gd_out, acc_t* dmax_out) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::width;
  const int64_t vec_len = len - len % W;
  g += lo;
  d += lo;
  const acc_t gamma = coef[0];
  for (int64_t i = 0; i < vec_len; i += W) store(tile + i, gamma * load<acc_t>(g + i));
  for (int64_t i = vec_len; i < len; ++i) tile[i] = gamma * g[i];
  for (int64_t k = 0; k < count; ++k) {
    const acc_t cy = coef[1 + k], cs = coef[1 + count + k];
    const hist_t* s = S + slot[k] * n + lo;
    const hist_t* y = Y + slot[k] * n + lo;
    for (int64_t i = 0; i < vec_len; i += W)
      store(tile + i, load<acc_t>(tile + i) + (cy * load<acc_t>(y + i) + cs * load<acc_t>(s + i)));
    for (int64_t i = vec_len; i < len; ++i) tile[i] += cy * scalar(y[i]) + cs * scalar(s[i]);
  }
  // A NaN in d makes g.d NaN, which the caller reports; the max needs no NaN handling.
  const V zero{};
  V gd{}, dmax{};
  for (int64_t i = 0; i < vec_len; i += W) {
    const V di = -load<acc_t>(tile + i);
    store(d + i, di);
    gd += load<acc_t>(g + i) * di;
    const V a = di < zero ? -di : di;
    dmax = a > dmax ? a : dmax;
  }
  acc_t t_gd = lane_sum(gd), t_max = lane_max(dmax);
  for (int64_t i = vec_len; i < len; ++i) {
    const acc_t di = -tile[i];
    d[i] = di;
    t_gd += g[i] * di;
    t_max = std::max(t_max, std::abs(di));
  }
  *gd_out = t_gd;
  *dmax_out = t_max;
}

// The chunk kernels compiled for the baseline ISA and for AVX2 (same results, see vec.h).
template <typename acc_t, typename hist_t, bool kGram>
void pass1_base(const hist_t* S, const hist_t* Y, const acc_t* g, const int64_t* slot,
                int64_t count, int64_t n, int64_t newest, int64_t lo, int64_t hi, acc_t* out) {
  pass1_chunk<acc_t, hist_t, kGram>(S, Y, g, slot, count, n, newest, lo, hi, out);
}
template <typename acc_t, typename hist_t>
void pass2_base(const hist_t* S, const hist_t* Y, const acc_t* g, const acc_t* coef,
                const int64_t* slot, int64_t count, int64_t n, int64_t lo, int64_t len,
                acc_t* tile, acc_t* d, acc_t* gd, acc_t* dmax) {
  pass2_chunk<acc_t, hist_t>(S, Y, g, coef, slot, count, n, lo, len, tile, d, gd, dmax);
}
#if SOO_HAVE_AVX2_PATH
template <typename acc_t, typename hist_t, bool kGram>
SOO_TARGET_AVX2 void pass1_avx2(const hist_t* S, const hist_t* Y, const acc_t* g,
                                const int64_t* slot, int64_t count, int64_t n, int64_t newest,
                                int64_t lo, int64_t hi, acc_t* out) {
  pass1_chunk<acc_t, hist_t, kGram>(S, Y, g, slot, count, n, newest, lo, hi, out);
}
template <typename acc_t, typename hist_t>
SOO_TARGET_AVX2 void pass2_avx2(const hist_t* S, const hist_t* Y, const acc_t* g,
                                const acc_t* coef, const int64_t* slot, int64_t count, int64_t n,
                                int64_t lo, int64_t len, acc_t* tile, acc_t* d, acc_t* gd,
                                acc_t* dmax) {
  pass2_chunk<acc_t, hist_t>(S, Y, g, coef, slot, count, n, lo, len, tile, d, gd, dmax);
}
#endif

template <typename scalar_t, typename hist_t>
void direction_kernel(const hist_t* S, const hist_t* Y, scalar_t* SY, scalar_t* YY,
                      const scalar_t* g, scalar_t* d, scalar_t* stats, int64_t n, int64_t m,
                      int64_t newest, int64_t count, bool update_gram) {
  using acc_t = scalar_t;
  auto pass1 = update_gram ? pass1_base<acc_t, hist_t, true> : pass1_base<acc_t, hist_t, false>;
  auto pass2 = pass2_base<acc_t, hist_t>;
#if SOO_HAVE_AVX2_PATH
  if (cpu::cpu_has_avx2()) {
    pass1 = update_gram ? pass1_avx2<acc_t, hist_t, true> : pass1_avx2<acc_t, hist_t, false>;
    pass2 = pass2_avx2<acc_t, hist_t>;
  }
#endif
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  const int ndots = update_gram ? kDotsWithGram : kDotsPlain;
  std::vector<int64_t> slot(count);
  for (int64_t k = 0; k < count; ++k) slot[k] = ring_slot(newest, count, m, k);

  // Pass 1: partial dots per chunk, laid out [chunk][dot][count].
  std::vector<acc_t> partial(n_chunks * ndots * count);
  if (count > 0) {
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c)
        pass1(S, Y, g, slot.data(), count, n, newest, c * kChunk, std::min(n, (c + 1) * kChunk),
              partial.data() + c * ndots * count);
    });
  }
  std::vector<acc_t> dots(ndots * count, acc_t(0));
  for (int64_t c = 0; c < n_chunks; ++c)
    for (int64_t v = 0; v < ndots * count; ++v) dots[v] += partial[c * ndots * count + v];

  std::vector<acc_t> coef(1 + 2 * count, acc_t(1));  // count == 0: d = -g
  if (count > 0) {
    if (update_gram) lbfgs_store_gram(dots.data(), count, m, newest, SY, YY);
    lbfgs_coefficients(dots.data(), dots.data() + count, SY, YY, count, m, newest, coef.data());
  }

  // Pass 2: the direction, with partial g.d and max|d| per chunk.
  std::vector<acc_t> gd_part(n_chunks), dmax_part(n_chunks);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> tile(kChunk);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * kChunk;
      pass2(S, Y, g, coef.data(), slot.data(), count, n, lo, std::min(n, lo + kChunk) - lo,
            tile.data(), d, &gd_part[c], &dmax_part[c]);
    }
  });
  acc_t gd = 0, dmax = 0;
  for (int64_t c = 0; c < n_chunks; ++c) {
    gd += gd_part[c];
    dmax = std::max(dmax, dmax_part[c]);
  }
  stats[0] = gd;
  stats[1] = gd != gd ? gd : dmax;  // non-finite d: report NaN, as torch.max would
}

}  // namespace

void check_lbfgs_direction_args(const at::Tensor& S, const at::Tensor& Y, const at::Tensor& SY,
                                const at::Tensor& YY, const at::Tensor& g, int64_t newest,
                                int64_t count) {
  TORCH_CHECK(g.dim() == 1, "lbfgs_direction: g must be 1-D, got ", g.sizes());
  TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble,
              "lbfgs_direction: g must be float32 or float64, got ", g.scalar_type());
  TORCH_CHECK(S.dim() == 2 && S.sizes() == Y.sizes() && S.size(1) == g.size(0),
              "lbfgs_direction: S and Y must be [m, n] with n = len(g)");
  TORCH_CHECK(S.scalar_type() == Y.scalar_type() &&
                  (S.scalar_type() == g.scalar_type() ||
                   (S.scalar_type() == at::kBFloat16 && g.scalar_type() == at::kFloat)),
              "lbfgs_direction: history dtype ", S.scalar_type(), " not allowed with a ",
              g.scalar_type(), " gradient");
  const int64_t m = S.size(0);
  TORCH_CHECK(SY.sizes() == at::IntArrayRef({m, m}) && YY.sizes() == SY.sizes() &&
                  SY.scalar_type() == g.scalar_type() && YY.scalar_type() == g.scalar_type(),
              "lbfgs_direction: SY and YY must be [m, m] of g's dtype");
  TORCH_CHECK(SY.is_contiguous() && YY.is_contiguous(),
              "lbfgs_direction: SY and YY must be contiguous (they are updated in place)");
  TORCH_CHECK(count >= 0 && count <= m, "lbfgs_direction: count must be in [0, m]");
  TORCH_CHECK(newest >= 0 && newest < std::max<int64_t>(m, 1),
              "lbfgs_direction: newest must be in [0, m)");
  for (const at::Tensor* t : {&S, &Y, &SY, &YY})
    TORCH_CHECK(t->device() == g.device(), "lbfgs_direction: all tensors must be on one device");
}

std::tuple<at::Tensor, at::Tensor> lbfgs_direction_cpu(const at::Tensor& S, const at::Tensor& Y,
                                                       at::Tensor& SY, at::Tensor& YY,
                                                       const at::Tensor& g, int64_t newest,
                                                       int64_t count, bool update_gram) {
  check_lbfgs_direction_args(S, Y, SY, YY, g, newest, count);
  const at::Tensor Sc = S.contiguous(), Yc = Y.contiguous(), gc = g.contiguous();
  at::Tensor d = at::empty_like(gc);
  at::Tensor stats = at::empty({2}, g.options());
  const int64_t n = g.size(0), m = S.size(0);
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "lbfgs_direction_cpu", [&] {
    // bfloat16 storage only with float gradients (checked above); the double instantiation
    // never runs with it.
    using bf16_t = std::conditional_t<std::is_same_v<scalar_t, float>, at::BFloat16, scalar_t>;
    auto run = [&](auto* hist_ptr_tag) {
      using hist_t = std::remove_pointer_t<decltype(hist_ptr_tag)>;
      direction_kernel<scalar_t, hist_t>(Sc.data_ptr<hist_t>(), Yc.data_ptr<hist_t>(),
                                         SY.data_ptr<scalar_t>(), YY.data_ptr<scalar_t>(),
                                         gc.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(),
                                         stats.data_ptr<scalar_t>(), n, m, newest, count,
                                         update_gram);
    };
    if (S.scalar_type() == at::kBFloat16)
      run(static_cast<bf16_t*>(nullptr));
    else
      run(static_cast<scalar_t*>(nullptr));
  });
  return {d, stats};
}

TORCH_LIBRARY_IMPL(soo, CPU, m) {
  m.impl("lbfgs_direction", &lbfgs_direction_cpu);
}

}  // namespace soo
