// DRSOM (dimension-reduced second-order method): the three fused vector ops the optimizer needs
// per step, shared declarations of the CPU and CUDA kernels.
//
//   drsom_perturb: x0 <- x (save), x <- x0 + t v                      (one pass)
//   drsom_reduce:  q_j = (g_pert - g).V_j / t, and with_gram G_ij = V_i.V_j, c_j = g.V_j
//                  (one pass over g_pert, g and the k directions)
//   drsom_update:  p <- sum_j alpha_j V_j, x <- x + p                   (one pass; p may alias a V_j)
//   drsom_subproblem: the k x k trust-region step from Q, G, c and gamma (drsom_subproblem.h)
//
// t and alpha live on the vectors' device, so none of the ops synchronises with the host.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>
#include <vector>

namespace soo {

constexpr int64_t kDrsomMaxDirs = 8;  // k <= 8 directions (CUDA passes their pointers by value)

// Number of reduced values per pass: q (k), and with the Gram block the upper triangle of G
// (k (k + 1) / 2, row-major: (0,0), (0,1), .., (0,k-1), (1,1), ..) and c (k).
inline int64_t drsom_num_dots(int64_t k, bool with_gram) {
  return with_gram ? k + k * (k + 1) / 2 + k : k;
}

// Argument checks shared by both devices (the Python wrappers check the same things first).
void check_drsom_perturb_args(const at::Tensor& x, const at::Tensor& x0, const at::Tensor& v,
                              const at::Tensor& t);
void check_drsom_reduce_args(const at::Tensor& g_pert, const at::Tensor& g,
                             at::TensorList V, const at::Tensor& t);
void check_drsom_update_args(const at::Tensor& x, const at::Tensor& p, at::TensorList V,
                             const at::Tensor& alpha);
void check_drsom_subproblem_args(const at::Tensor& Q, const at::Tensor& G, const at::Tensor& c,
                                 double gamma, double max_length, double gamma_increase);
// The Gram matrix's regulariser in drsom_subproblem: sqrt(eps) of the inputs' dtype.
double drsom_subproblem_reg(at::ScalarType dtype);

// The outputs of drsom_reduce, shaped and typed (q [k]; G [k, k] and c [k], or [0, 0] and [0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> drsom_reduce_outputs(const at::Tensor& g,
                                                                    int64_t k, bool with_gram);

}  // namespace soo

#include "drsom_subproblem.h"
