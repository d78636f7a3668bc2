// CPU kernel of soo::bfgs_direction: a row-parallel sweep over H for H y and H g, O(n) serial
// work for the scalars and d, and (when updating) a row-parallel sweep writing H'.  Every sum
// has a fixed order (SIMD lanes of vec.h, then serial), so results do not depend on the number
// of threads or on the instruction set.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../bfgs_direction.h"
#include "vec.h"

namespace soo {
namespace {

using cpu::lane_sum;
using cpu::load;
using cpu::store;
using cpu::Vec;

// Rows [r0, r1): hg_i = H_i . g and, with kUpdate, u_i = H_i . y.
template <typename acc_t, bool kUpdate>
SOO_ALWAYS_INLINE void products_rows(const acc_t* H, const acc_t* y, const acc_t* g, int64_t n,
                                     int64_t r0, int64_t r1, acc_t* u, acc_t* hg) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::width;
  for (int64_t i = r0; i < r1; ++i) {
    const acc_t* row = H + i * n;
    V vy{}, vg{};
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const V h = load<acc_t>(row + j);
      vg += h * load<acc_t>(g + j);
      if constexpr (kUpdate) vy += h * load<acc_t>(y + j);
    }
    acc_t ty = lane_sum(vy), tg = lane_sum(vg);
    for (; j < n; ++j) {
      tg += row[j] * g[j];
      if constexpr (kUpdate) ty += row[j] * y[j];
    }
    hg[i] = tg;
    if constexpr (kUpdate) u[i] = ty;
  }
}

// Rows [r0, r1) of H' = H + (c s_i s_j - rho (s_i u_j + u_i s_j)): the same operations for
// (i, j) and (j, i), so H' stays exactly symmetric.
template <typename acc_t>
SOO_ALWAYS_INLINE void update_rows(acc_t* H, const acc_t* s, const acc_t* u, acc_t rho, acc_t c,
                                   int64_t n, int64_t r0, int64_t r1) {
  using V = typename Vec<acc_t>::type;
  constexpr int W = Vec<acc_t>::width;
  for (int64_t i = r0; i < r1; ++i) {
    acc_t* row = H + i * n;
    const acc_t si = s[i], ui = u[i];
    int64_t j = 0;
    for (; j + W <= n; j += W) {
      const V sj = load<acc_t>(s + j), uj = load<acc_t>(u + j);
      store(row + j, load<acc_t>(row + j) + (c * (si * sj) - rho * (si * uj + ui * sj)));
    }
    for (; j < n; ++j) row[j] = row[j] + (c * (si * s[j]) - rho * (si * u[j] + ui * s[j]));
  }
}

template <typename acc_t, bool kUpdate>
void products_base(const acc_t* H, const acc_t* y, const acc_t* g, int64_t n, int64_t r0,
                   int64_t r1, acc_t* u, acc_t* hg) {
  products_rows<acc_t, kUpdate>(H, y, g, n, r0, r1, u, hg);
}
template <typename acc_t>
void update_base(acc_t* H, const acc_t* s, const acc_t* u, acc_t rho, acc_t c, int64_t n,
                 int64_t r0, int64_t r1) {
  update_rows<acc_t>(H, s, u, rho, c, n, r0, r1);
}
#if SOO_HAVE_AVX2_PATH
template <typename acc_t, bool kUpdate>
SOO_TARGET_AVX2 void products_avx2(const acc_t* H, const acc_t* y, const acc_t* g, int64_t n,
                                   int64_t r0, int64_t r1, acc_t* u, acc_t* hg) {
  products_rows<acc_t, kUpdate>(H, y, g, n, r0, r1, u, hg);
}
template <typename acc_t>
SOO_TARGET_AVX2 void update_avx2(acc_t* H, const acc_t* s, const acc_t* u, acc_t rho, acc_t c,
                                 int64_t n, int64_t r0, int64_t r1) {
  update_rows<acc_t>(H, s, u, rho, c, n, r0, r1);
}
#endif

template <typename acc_t>
void bfgs_kernel(acc_t* H, const acc_t* s, const acc_t* y, const acc_t* g, acc_t* d,
                 acc_t* stats, int64_t n, bool update) {
  auto products = update ? products_base<acc_t, true> : products_base<acc_t, false>;
  auto update_fn = update_base<acc_t>;
#if SOO_HAVE_AVX2_PATH
  if (cpu::cpu_has_avx2()) {
    products = update ? products_avx2<acc_t, true> : products_avx2<acc_t, false>;
    update_fn = update_avx2<acc_t>;
  }
#endif
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(n, 1));  // rows per task
  std::vector<acc_t> u(update ? n : 0), hg(n);
  at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
    products(H, y, g, n, r0, r1, u.data(), hg.data());
  });

  acc_t rho = 0, c = 0, ug = 0, sg = 0;
  if (update) {
    acc_t ys = 0, yu = 0;
    for (int64_t i = 0; i < n; ++i) {
      ys += y[i] * s[i];
      yu += y[i] * u[i];
      ug += u[i] * g[i];
      sg += s[i] * g[i];
    }
    bfgs_scalars(ys, yu, &rho, &c);
  }
  acc_t gd = 0, dmax = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t di = update ? bfgs_direction_entry(hg[i], s[i], u[i], rho, c, ug, sg) : -hg[i];
    d[i] = di;
    gd += g[i] * di;
    dmax = std::max(dmax, std::abs(di));
  }
  stats[0] = gd;
  stats[1] = gd != gd ? gd : dmax;  // non-finite d: report NaN, as torch.max would

  if (update) {
    at::parallel_for(0, n, grain, [&](int64_t r0, int64_t r1) {
      update_fn(H, s, u.data(), rho, c, n, r0, r1);
    });
  }
}

}  // namespace

void check_bfgs_direction_args(const at::Tensor& H, const at::Tensor& s, const at::Tensor& y,
                               const at::Tensor& g) {
  TORCH_CHECK(g.dim() == 1, "bfgs_direction: g must be 1-D, got ", g.sizes());
  TORCH_CHECK(g.scalar_type() == at::kFloat || g.scalar_type() == at::kDouble,
              "bfgs_direction: g must be float32 or float64, got ", g.scalar_type());
  const int64_t n = g.size(0);
  TORCH_CHECK(H.sizes() == at::IntArrayRef({n, n}) && s.sizes() == g.sizes() &&
                  y.sizes() == g.sizes(),
              "bfgs_direction: H must be [n, n] and s, y [n] with n = len(g)");
  TORCH_CHECK(H.scalar_type() == g.scalar_type() && s.scalar_type() == g.scalar_type() &&
                  y.scalar_type() == g.scalar_type(),
              "bfgs_direction: H, s, y must have g's dtype");
  TORCH_CHECK(H.is_contiguous(), "bfgs_direction: H must be contiguous (it is updated in place)");
  for (const at::Tensor* t : {&H, &s, &y})
    TORCH_CHECK(t->device() == g.device(), "bfgs_direction: all tensors must be on one device");
}

std::tuple<at::Tensor, at::Tensor> bfgs_direction_cpu(at::Tensor& H, const at::Tensor& s,
                                                      const at::Tensor& y, const at::Tensor& g,
                                                      bool update) {
  check_bfgs_direction_args(H, s, y, g);
  const at::Tensor sc = s.contiguous(), yc = y.contiguous(), gc = g.contiguous();
  at::Tensor d = at::empty_like(gc);
  at::Tensor stats = at::empty({2}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "bfgs_direction_cpu", [&] {
    bfgs_kernel<scalar_t>(H.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(),
                          yc.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(),
                          d.data_ptr<scalar_t>(), stats.data_ptr<scalar_t>(), g.size(0), update);
  });
  return {d, stats};
}

TORCH_LIBRARY_IMPL(soo, CPU, m) {
  m.impl("bfgs_direction", &bfgs_direction_cpu);
}

}  // namespace soo
