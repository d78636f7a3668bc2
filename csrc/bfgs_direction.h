// Dense BFGS direction: what the CPU and CUDA kernels share.
//
// H is the n x n inverse-Hessian approximation.  With u = H y, rho = 1 / y.s and
// c = rho^2 y.u + rho, the BFGS update is
//   H' = H - rho (s u^T + u s^T) + c s s^T
// and the new direction needs no second product with H':
//   H' g = H g - rho (u.g s + s.g u) + c s.g s.
// So one sweep over H computes u and H g (two products per row), O(n) work gives the scalars and
// d, and one more sweep writes H' (only when updating): 3 n^2 elements moved, the minimum for an
// in-place update.  Each entry of H' is computed so that (i, j) and (j, i) give the same bits,
// which keeps H exactly symmetric.
#pragma once

#include <ATen/core/Tensor.h>

#if defined(__CUDACC__)
#define SOO_BFGS_HD __host__ __device__
#else
#define SOO_BFGS_HD
#endif

namespace soo {

// rho and c from the reductions y.s and y.u.
template <typename acc_t>
SOO_BFGS_HD inline void bfgs_scalars(acc_t ys, acc_t yu, acc_t* rho, acc_t* c) {
  *rho = acc_t(1) / ys;
  *c = *rho * *rho * yu + *rho;
}

// Entry i of d = -H' g from (H g)_i, s_i, u_i and the scalars (u.g, s.g).
template <typename acc_t>
SOO_BFGS_HD inline acc_t bfgs_direction_entry(acc_t hg, acc_t s, acc_t u, acc_t rho, acc_t c,
                                              acc_t ug, acc_t sg) {
  return -(hg - rho * (ug * s + sg * u) + c * sg * s);
}

std::tuple<at::Tensor, at::Tensor> bfgs_direction_cpu(at::Tensor& H, const at::Tensor& s,
                                                      const at::Tensor& y, const at::Tensor& g,
                                                      bool update);

// Argument checks shared by both devices (the Python wrapper checks the same things first).
void check_bfgs_direction_args(const at::Tensor& H, const at::Tensor& s, const at::Tensor& y,
                               const at::Tensor& g);

}  // namespace soo
