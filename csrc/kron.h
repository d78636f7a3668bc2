// Kronecker factors of K-FAC and Shampoo: shared declarations of the CPU and CUDA kernels.
// The contract of every op is the pure-PyTorch reference in soo_ext/reference.py ("Kronecker
// factors"); all ops take a [..., n, n] stack (a bucket of same-size factors) or one 2-D matrix.
//
//   kron_factor_update_(F, X, decay, scale)   F <- decay F + scale X^T X, then F <- (F + F^T) / 2
//   kron_damped_inverse(A, damping)           (A + damping I)^{-1} by Cholesky, float64 retry
//   kron_eigh(A)                              A = Q diag(d) Q^T, d clamped >= 0, float64 retry
//   kron_inverse_root(A, p, eps, method, ..)  (A + eps I)^{-1/p}, coupled Newton or eigh
//   kfac_precondition_eigen(grad, QG, dG, QA, dA, damping)
//                                             QG [(QG^T grad QA) / (dG dA^T + damping)] QA^T
//
// Statuses (int32, one per matrix): 0 ok, 1 fallback (float64 retry / Newton not converged),
// 2 failed (the output of that matrix is zero, or d = 0, Q = I for eigh).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/accumulate.h>

#include <cstdint>
#include <string>

namespace soo {

constexpr int32_t kKronOk = 0;
constexpr int32_t kKronFallback = 1;
constexpr int32_t kKronFailed = 2;

// float32 epsilon: the scale-aware part of the retry damping of kron_damped_inverse,
// damping' = 10 damping + kKronEps32 |tr A| / n.
constexpr double kKronEps32 = 1.1920928955078125e-07;
// A Newton step is rejected (and the matrix stops) when its error grows above this factor.
constexpr double kKronNewtonGrowth = 1.2;

// Number of matrices in a [..., r, c] stack (defined when r or c is 0, unlike reshape(-1, ...)).
inline int64_t stack_count(const at::Tensor& A) {
  return c10::multiply_integers(A.sizes().slice(0, A.dim() - 2));
}

// Argument checks shared by both devices (the Python wrappers check the same things first).
void check_kron_square(const char* op, const at::Tensor& A);
void check_kron_factor_update_args(const at::Tensor& F, const at::Tensor& X);

// F <- decay F + scale X^T X over the stacked factors [B, d, d] (one GEMM, or one batched GEMM),
// then symmetrize(F3), the device's kernel (the GEMM's rounding is not symmetric); a
// non-contiguous F gets the result copied back.
template <typename Symmetrize>
void kron_factor_update(const at::Tensor& F, const at::Tensor& X, double decay, double scale,
                        Symmetrize&& symmetrize) {
  check_kron_factor_update_args(F, X);
  const int64_t d = F.size(-1), N = X.size(-2);
  const int64_t B = stack_count(F);
  at::Tensor F3 = F.is_contiguous() ? F.view({B, d, d}) : F.contiguous().view({B, d, d});
  at::Tensor X3 = X.reshape({B, N, d}).to(F.scalar_type());
  if (B == 1) {
    at::Tensor F2 = F3[0], X2 = X3[0];
    F2.addmm_(X2.mT(), X2, decay, scale);
  } else {
    F3.baddbmm_(X3.mT(), X3, decay, scale);
  }
  symmetrize(F3);
  if (!F.is_contiguous()) const_cast<at::Tensor&>(F).copy_(F3.view(F.sizes()));
}
void check_kron_inverse_root_args(const at::Tensor& A, int64_t p, double epsilon,
                                  const std::string& method, int64_t max_iters, double tol);
void check_kfac_precondition_args(const at::Tensor& grad, const at::Tensor& QG,
                                  const at::Tensor& dG, const at::Tensor& QA,
                                  const at::Tensor& dA);

}  // namespace soo
