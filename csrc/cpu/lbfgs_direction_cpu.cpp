// CPU kernel of soo::lbfgs_direction: two parallel passes over the history (at::parallel_for).
//
// Work is cut into fixed-size chunks whose partial sums are combined in chunk order, so results
// do not depend on the number of threads (bit-identical reruns and resumes).  Inner loops keep
// kLanes independent accumulators so the compiler vectorises them without reassociating sums.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../lbfgs_direction.h"

namespace soo {
namespace {

constexpr int64_t kChunk = 16384;  // elements per work item: long runs per row, tile fits in L2
constexpr int kLanes = 16;

template <typename acc_t, typename hist_t>
inline acc_t to_acc(hist_t x) { return static_cast<acc_t>(x); }

// Sum over [lo, hi) of a[i] * b[i], with a, b possibly of different storage types.
template <typename acc_t, typename A, typename B>
inline acc_t dot_range(const A* a, const B* b, int64_t lo, int64_t hi) {
  acc_t lane[kLanes] = {};
  int64_t i = lo;
  for (; i + kLanes <= hi; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += to_acc<acc_t>(a[i + l]) * to_acc<acc_t>(b[i + l]);
  acc_t total = 0;
  for (; i < hi; ++i) total += to_acc<acc_t>(a[i]) * to_acc<acc_t>(b[i]);
  for (int l = 0; l < kLanes; ++l) total += lane[l];
  return total;
}

template <typename scalar_t, typename hist_t>
void direction_kernel(const hist_t* S, const hist_t* Y, scalar_t* SY, scalar_t* YY,
                      const scalar_t* g, scalar_t* d, scalar_t* stats, int64_t n, int64_t m,
                      int64_t newest, int64_t count, bool update_gram) {
  using acc_t = scalar_t;
  const int64_t n_chunks = (n + kChunk - 1) / kChunk;
  const int ndots = update_gram ? kDotsWithGram : kDotsPlain;
  std::vector<int64_t> slot(count);
  for (int64_t k = 0; k < count; ++k) slot[k] = ring_slot(newest, count, m, k);

  // Pass 1: partial dots per chunk, laid out [chunk][dot][count].
  std::vector<acc_t> partial(n_chunks * ndots * count);
  if (count > 0) {
    const hist_t* s_new = S + newest * n;
    const hist_t* y_new = Y + newest * n;
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t lo = c * kChunk, hi = std::min(n, lo + kChunk);
        acc_t* out = partial.data() + c * ndots * count;
        for (int64_t k = 0; k < count; ++k) {
          const hist_t* s = S + slot[k] * n;
          const hist_t* y = Y + slot[k] * n;
          out[k] = dot_range<acc_t>(s, g, lo, hi);
          out[count + k] = dot_range<acc_t>(y, g, lo, hi);
          if (update_gram) {
            out[2 * count + k] = dot_range<acc_t>(s, y_new, lo, hi);
            out[3 * count + k] = dot_range<acc_t>(s_new, y, lo, hi);
            out[4 * count + k] = dot_range<acc_t>(y, y_new, lo, hi);
          }
        }
      }
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

  // Pass 2: d = -(gamma g + sum coef_y y_k + sum coef_s s_k), with partial g.d and max|d|.
  std::vector<acc_t> gd_part(n_chunks), dmax_part(n_chunks);
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<acc_t> tile(kChunk);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * kChunk, len = std::min(n, lo + kChunk) - lo;
      const acc_t gamma = coef[0];
      for (int64_t i = 0; i < len; ++i) tile[i] = gamma * g[lo + i];
      for (int64_t k = 0; k < count; ++k) {
        const acc_t cy = coef[1 + k], cs = coef[1 + count + k];
        const hist_t* s = S + slot[k] * n + lo;
        const hist_t* y = Y + slot[k] * n + lo;
        for (int64_t i = 0; i < len; ++i)
          tile[i] += cy * to_acc<acc_t>(y[i]) + cs * to_acc<acc_t>(s[i]);
      }
      // Lane-wise reductions so the loop vectorises; a NaN in d makes g.d NaN, so the
      // max needs no NaN handling of its own beyond that.
      acc_t gd_lane[kLanes] = {}, max_lane[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes)
        for (int l = 0; l < kLanes; ++l) {
          const acc_t di = -tile[i + l];
          d[lo + i + l] = di;
          gd_lane[l] += g[lo + i + l] * di;
          const acc_t a = std::abs(di);
          max_lane[l] = a > max_lane[l] ? a : max_lane[l];
        }
      acc_t gd = 0, dmax = 0;
      for (; i < len; ++i) {
        const acc_t di = -tile[i];
        d[lo + i] = di;
        gd += g[lo + i] * di;
        dmax = std::max(dmax, std::abs(di));
      }
      for (int l = 0; l < kLanes; ++l) {
        gd += gd_lane[l];
        dmax = std::max(dmax, max_lane[l]);
      }
      gd_part[c] = gd;
      dmax_part[c] = dmax;
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
    auto run = [&](auto* hist_ptr_tag) {
      using hist_t = std::remove_pointer_t<decltype(hist_ptr_tag)>;
      direction_kernel<scalar_t, hist_t>(Sc.data_ptr<hist_t>(), Yc.data_ptr<hist_t>(),
                                         SY.data_ptr<scalar_t>(), YY.data_ptr<scalar_t>(),
                                         gc.data_ptr<scalar_t>(), d.data_ptr<scalar_t>(),
                                         stats.data_ptr<scalar_t>(), n, m, newest, count,
                                         update_gram);
    };
    if (S.scalar_type() == at::kBFloat16) {
      if constexpr (std::is_same_v<scalar_t, float>) run(static_cast<at::BFloat16*>(nullptr));
    } else {
      run(static_cast<scalar_t*>(nullptr));
    }
  });
  return {d, stats};
}

TORCH_LIBRARY_IMPL(soo, CPU, m) {
  m.impl("lbfgs_direction", &lbfgs_direction_cpu);
}

}  // namespace soo
