// L-BFGS direction in compact form: what the CPU and CUDA kernels share.
//
// d = -H g with H the L-BFGS inverse-Hessian approximation of the pairs (s_i, y_i) kept in
// [m, n] ring buffers.  Pass 1 reads the history once for S^T g and Y^T g (and, right after a
// push, the new Gram row/column); both loops of the recursion then run on those O(m^2) scalars
// (lbfgs_coefficients below); pass 2 reads the history once more to form
//   d = -(gamma g + sum_k coef_y[k] y_k + sum_k coef_s[k] s_k)
// and reduces g.d and max|d| on the way.
#pragma once

#include <ATen/core/Tensor.h>

#include "host_device.h"

namespace soo {

// Dot products per history row in pass 1: s.g and y.g, plus the Gram entries of a new pair.
constexpr int kDotsPlain = 2;
constexpr int kDotsWithGram = 5;  // ... s_k.y_new, s_new.y_k, y_k.y_new

SOO_HOST_DEVICE inline int64_t ring_slot(int64_t newest, int64_t count, int64_t m, int64_t i) {
  return (newest - count + 1 + i + m) % m;  // physical slot of logical pair i (0 = oldest)
}

// Writes the Gram row/column of slot `newest` from pass-1 dots laid out as [dot][count].
template <typename acc_t>
SOO_HOST_DEVICE void lbfgs_store_gram(const acc_t* dots, int64_t count, int64_t m, int64_t newest,
                                      acc_t* SY, acc_t* YY) {
  for (int64_t k = 0; k < count; ++k) {
    const int64_t p = ring_slot(newest, count, m, k);
    SY[p * m + newest] = dots[2 * count + k];  // s_p . y_new
    SY[newest * m + p] = dots[3 * count + k];  // s_new . y_p
    YY[p * m + newest] = dots[4 * count + k];
    YY[newest * m + p] = dots[4 * count + k];
  }
}

// Both loops of the two-loop recursion on scalars.  sg, yg: s_k.g and y_k.g in logical order.
// SY, YY: m x m Gram blocks over physical slots.  Writes coef = [gamma, coef_y[count],
// coef_s[count]] so that H g = gamma g + sum coef_y[k] y_k + sum coef_s[k] s_k.
template <typename acc_t>
SOO_HOST_DEVICE void lbfgs_coefficients(const acc_t* sg, const acc_t* yg, const acc_t* SY,
                                        const acc_t* YY, int64_t count, int64_t m,
                                        int64_t newest, acc_t* coef) {
  acc_t* alpha = coef + 1;         // first-loop alphas, turned into coef_y at the end
  acc_t* coef_s = coef + 1 + count;
  const acc_t gamma = SY[newest * m + newest] / YY[newest * m + newest];
  coef[0] = gamma;
  for (int64_t i = count - 1; i >= 0; --i) {  // s_i . q, q = g - sum_{j>i} alpha_j y_j
    const int64_t pi = ring_slot(newest, count, m, i);
    acc_t a = sg[i];
    for (int64_t j = i + 1; j < count; ++j) a -= alpha[j] * SY[pi * m + ring_slot(newest, count, m, j)];
    alpha[i] = a / SY[pi * m + pi];
  }
  for (int64_t i = 0; i < count; ++i) {  // y_i . r, r = gamma q + sum_{l<i} coef_s[l] s_l
    const int64_t pi = ring_slot(newest, count, m, i);
    acc_t ay = 0;
    for (int64_t j = 0; j < count; ++j) ay += alpha[j] * YY[pi * m + ring_slot(newest, count, m, j)];
    acc_t yr = gamma * (yg[i] - ay);
    for (int64_t l = 0; l < i; ++l) yr += coef_s[l] * SY[ring_slot(newest, count, m, l) * m + pi];
    coef_s[i] = alpha[i] - yr / SY[pi * m + pi];
  }
  for (int64_t j = 0; j < count; ++j) alpha[j] = -gamma * alpha[j];
}

std::tuple<at::Tensor, at::Tensor> lbfgs_direction_cpu(const at::Tensor& S, const at::Tensor& Y,
                                                       at::Tensor& SY, at::Tensor& YY,
                                                       const at::Tensor& g, int64_t newest,
                                                       int64_t count, bool update_gram);

// Argument checks shared by both devices (the Python wrapper checks the same things first).
void check_lbfgs_direction_args(const at::Tensor& S, const at::Tensor& Y, const at::Tensor& SY,
                                const at::Tensor& YY, const at::Tensor& g, int64_t newest,
                                int64_t count);

}  // namespace soo
