// DRSOM's k x k trust-region subproblem (k <= 8), solved in double by straight-line scalar code
// shared by the CPU op and the single-thread CUDA kernel (the same algorithm and order of
// operations; nvcc may contract a product and a sum into an FMA, so the last bits can differ).
//
// Model m(a) = c.a + a.Q a / 2 over span V with Gram matrix G (Q, G symmetrised here).  With the
// directions scaled to unit length (s_i = G_ii^-1/2): Gh = s G s + reg I, Qh = s Q s, ch = s c;
// the extreme eigenvalues of L^-1 Qh L^-T (Gh = L L^T; cyclic Jacobi) give
//   lb = max(-lambda_min, 1e-8),  top = max(lb, lambda_max) + max|lambda|,
//   lambda = gamma top + (1 - gamma) lb,  ah = -(Qh + lambda Gh)^-1 ch   (partial pivoting).
// The step's length ||V a|| = sqrt(a.G a) must not exceed max_length: while it does (or is NaN),
// gamma climbs by gamma_increase (from kDrsomGammaFloor if it is 0) up to kDrsomGammaMax, at
// most kDrsomMaxRungs times, and the system is solved again (the eigenvalues do not change).
// out = [ah_i s_i (the step's coefficients on V), pred = -(ch.ah + ah.Qh ah / 2),
//        ok = 1 if Qh, ch and the eigenvalues are finite else 0, gamma used, length].
// Included by drsom.h (k <= kDrsomMaxDirs).
#pragma once

#include "host_device.h"

#include <math.h>

namespace soo {

constexpr double kDrsomLambdaFloor = 1e-8;  // lb floor, as in DRSOM.jl
constexpr double kDrsomGammaFloor = 1e-16;  // where a climb from gamma = 0 starts
constexpr double kDrsomGammaMax = 1e16;     // lambda ~ 1e16 lambda_max: steps below rounding
constexpr int kDrsomMaxRungs = 200;
constexpr int kDrsomSubproblemExtra = 4;    // out has k + 4 entries
// doubles of scratch the solve needs: six k x k matrices.  Passed in, so that the CUDA kernel
// keeps them in shared memory: as local arrays they made a 2.7 KB stack frame, and the driver
// reserves a kernel's stack for every thread that can be resident (~0.7 GB on an H200).
constexpr int kDrsomSubproblemWorkspace =
    6 * static_cast<int>(kDrsomMaxDirs) * static_cast<int>(kDrsomMaxDirs);

namespace subproblem {

SOO_HOST_DEVICE inline bool finite(double v) { return v - v == 0.0; }  // false for inf and NaN

// Eigenvalues of the symmetric k x k matrix A (destroyed) by cyclic Jacobi; lo/hi the extremes.
// False if they are not all finite.
SOO_HOST_DEVICE inline bool extreme_eigenvalues(double* A, int k, double* lo, double* hi) {
  double fro = 0.0;
  for (int i = 0; i < k * k; ++i) fro += A[i] * A[i];
  for (int sweep = 0; sweep < 64; ++sweep) {
    double off = 0.0;
    for (int p = 0; p < k; ++p)
      for (int q = p + 1; q < k; ++q) off += A[p * k + q] * A[p * k + q];
    if (!(off > 1e-34 * fro)) break;  // converged (or NaN, which stays on the diagonal)
    for (int p = 0; p < k; ++p) {
      for (int q = p + 1; q < k; ++q) {
        const double apq = A[p * k + q];
        if (apq == 0.0) continue;
        const double theta = (A[q * k + q] - A[p * k + p]) / (2.0 * apq);
        // t = tan of the rotation angle, the smaller root (no overflow for huge theta)
        double t = fabs(theta) > 1e150 ? 0.5 / theta
                                       : (theta >= 0 ? 1.0 : -1.0) /
                                             (fabs(theta) + sqrt(theta * theta + 1.0));
        const double cs = 1.0 / sqrt(t * t + 1.0), sn = t * cs, tau = sn / (1.0 + cs);
        A[p * k + p] -= t * apq;
        A[q * k + q] += t * apq;
        A[p * k + q] = A[q * k + p] = 0.0;
        for (int r = 0; r < k; ++r) {
          if (r == p || r == q) continue;
          const double arp = A[r * k + p], arq = A[r * k + q];
          A[r * k + p] = A[p * k + r] = arp - sn * (arq + tau * arp);
          A[r * k + q] = A[q * k + r] = arq + sn * (arp - tau * arq);
        }
      }
    }
  }
  double mn = A[0], mx = A[0];
  bool all_finite = true;
  for (int i = 0; i < k; ++i) {
    const double d = A[i * k + i];
    all_finite = all_finite && finite(d);
    mn = d < mn ? d : mn;
    mx = d > mx ? d : mx;
  }
  *lo = mn;
  *hi = mx;
  return all_finite;
}

// Solves A x = b (A destroyed, k x k) by Gaussian elimination with partial pivoting; a zero
// pivot gives non-finite x.
SOO_HOST_DEVICE inline void solve(double* A, const double* b, int k, double* x) {
  double r[static_cast<int>(kDrsomMaxDirs)];
  for (int i = 0; i < k; ++i) r[i] = b[i];
  for (int col = 0; col < k; ++col) {
    int piv = col;
    for (int i = col + 1; i < k; ++i)
      if (fabs(A[i * k + col]) > fabs(A[piv * k + col])) piv = i;
    if (piv != col) {
      for (int j = 0; j < k; ++j) {
        const double tmp = A[col * k + j];
        A[col * k + j] = A[piv * k + j];
        A[piv * k + j] = tmp;
      }
      const double tmp = r[col];
      r[col] = r[piv];
      r[piv] = tmp;
    }
    for (int i = col + 1; i < k; ++i) {
      const double f = A[i * k + col] / A[col * k + col];
      for (int j = col; j < k; ++j) A[i * k + j] -= f * A[col * k + j];
      r[i] -= f * r[col];
    }
  }
  for (int i = k - 1; i >= 0; --i) {
    double v = r[i];
    for (int j = i + 1; j < k; ++j) v -= A[i * k + j] * x[j];
    x[i] = v / A[i * k + i];
  }
}

}  // namespace subproblem

// Q, G row-major k x k, c [k]; out [k + 4] (see the top of the file); ws: scratch of
// kDrsomSubproblemWorkspace doubles.  reg: the Gram matrix's regulariser (sqrt(eps) of the
// params' dtype).
SOO_HOST_DEVICE inline void drsom_subproblem_solve(const double* Q, const double* G,
                                                   const double* c, int k, double gamma,
                                                   double max_length, double gamma_increase,
                                                   double reg, double* ws, double* out) {
  using namespace subproblem;
  constexpr int K = static_cast<int>(kDrsomMaxDirs);
  double* Qh = ws;
  double* Gh = Qh + K * K;
  double* L = Gh + K * K;
  double* M = L + K * K;
  double* Y = M + K * K;
  double* A = Y + K * K;
  double s[K], ch[K], ah[K];
  for (int i = 0; i < k; ++i) s[i] = 1.0 / sqrt(G[i * k + i]);
  bool ok = true;
  for (int i = 0; i < k; ++i) {
    ch[i] = c[i] * s[i];
    ok = ok && finite(ch[i]);
    for (int j = 0; j < k; ++j) {
      const double ss = s[i] * s[j];
      Qh[i * k + j] = 0.5 * (Q[i * k + j] + Q[j * k + i]) * ss;
      Gh[i * k + j] = 0.5 * (G[i * k + j] + G[j * k + i]) * ss + (i == j ? reg : 0.0);
      ok = ok && finite(Qh[i * k + j]);
    }
  }
  // Cholesky Gh = L L^T (a non-positive pivot gives NaN, which reaches the eigenvalues)
  for (int j = 0; j < k; ++j) {
    double d = Gh[j * k + j];
    for (int m = 0; m < j; ++m) d -= L[j * k + m] * L[j * k + m];
    L[j * k + j] = sqrt(d);
    for (int i = j + 1; i < k; ++i) {
      double v = Gh[i * k + j];
      for (int m = 0; m < j; ++m) v -= L[i * k + m] * L[j * k + m];
      L[i * k + j] = v / L[j * k + j];
      L[j * k + i] = 0.0;
    }
  }
  // Y = L^-1 Qh, then M = L^-1 Y^T = L^-1 Qh L^-T (forward substitution by columns)
  for (int col = 0; col < k; ++col)
    for (int i = 0; i < k; ++i) {
      double v = Qh[i * k + col];
      for (int m = 0; m < i; ++m) v -= L[i * k + m] * Y[m * k + col];
      Y[i * k + col] = v / L[i * k + i];
    }
  for (int col = 0; col < k; ++col)
    for (int i = 0; i < k; ++i) {
      double v = Y[col * k + i];
      for (int m = 0; m < i; ++m) v -= L[i * k + m] * M[m * k + col];
      M[i * k + col] = v / L[i * k + i];
    }
  for (int i = 0; i < k; ++i)
    for (int j = i + 1; j < k; ++j) M[i * k + j] = M[j * k + i] = 0.5 * (M[i * k + j] + M[j * k + i]);
  double lmin, lmax;
  ok = extreme_eigenvalues(M, k, &lmin, &lmax) && ok;
  const double lb = -lmin > kDrsomLambdaFloor ? -lmin : kDrsomLambdaFloor;
  const double top = (lb > lmax ? lb : lmax) + (fabs(lmin) > fabs(lmax) ? fabs(lmin) : fabs(lmax));
  double g = gamma, length = 0.0;
  for (int rung = 0;; ++rung) {
    const double lam = g * top + (1.0 - g) * lb;
    double rhs[K];
    for (int i = 0; i < k; ++i) {
      rhs[i] = -ch[i];
      for (int j = 0; j < k; ++j) A[i * k + j] = Qh[i * k + j] + lam * Gh[i * k + j];
    }
    solve(A, rhs, k, ah);
    double sq = 0.0;  // a.G a = ah.(Gh - reg I) ah
    for (int i = 0; i < k; ++i) {
      double ga = -reg * ah[i];
      for (int j = 0; j < k; ++j) ga += Gh[i * k + j] * ah[j];
      sq += ah[i] * ga;
    }
    length = sq < 0.0 ? 0.0 : sqrt(sq);  // rounding can make sq slightly negative; NaN stays
    const bool too_long = !(length <= max_length);  // also a NaN step (a singular system)
    if (!ok || !too_long || g >= kDrsomGammaMax || rung == kDrsomMaxRungs) break;
    g = g > 0.0 ? g * gamma_increase : kDrsomGammaFloor;
    g = g < kDrsomGammaMax ? g : kDrsomGammaMax;
  }
  double pred = 0.0;
  for (int i = 0; i < k; ++i) {
    double qa = 0.0;
    for (int j = 0; j < k; ++j) qa += Qh[i * k + j] * ah[j];
    pred -= ah[i] * (ch[i] + 0.5 * qa);
  }
  for (int i = 0; i < k; ++i) out[i] = ah[i] * s[i];
  out[k] = pred;
  out[k + 1] = ok ? 1.0 : 0.0;
  out[k + 2] = g;
  out[k + 3] = length;
}

}  // namespace soo
