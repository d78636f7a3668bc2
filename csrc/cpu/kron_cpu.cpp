// CPU kernels of the Kronecker-factor ops (csrc/kron.h) and the argument checks shared with CUDA.
//
// A bucket [B, n, n] of B >= 2 factors is cut into one contiguous chunk of matrices per intra-op
// thread (at::parallel_for); each chunk makes its own batched LAPACK/BLAS calls, which then run
// single-threaded (OpenMP does not nest), so the threads never wait on each other inside one
// factorisation.  A bucket of one matrix is one chunk and LAPACK/BLAS thread inside it (there
// the damped inverse uses potrs instead of MKL's threaded potri: see par_max_n).  On the CPU a failure is known at once
// (info and finiteness are host values), so only the matrices that failed are retried in float64.
//
//   kron_damped_inverse  damping added while copying (one pass), batched potrf
//                        (linalg_cholesky_ex) + potri (cholesky_inverse): ~n^3 flops against
//                        ~2n^3 for the LU inverse (getrf + getri) of torch.linalg.inv (potrs
//                        on the identity, ~2.3n^3 in all, for a lone matrix with threads)
//   kron_eigh            inputs checked for finiteness first (a non-finite matrix fails without
//                        a LAPACK call), batched syevd (linalg_eigh), per-matrix float64 retry
//   kron_inverse_root    eigh: as kron_eigh, then W = Q diag((l + eps)^{-1/(2p)}) in one pass
//                        and X = W W^T (one GEMM); newton: the coupled iteration per matrix,
//                        each matrix stopping on its own (checked every iteration: no sync cost
//                        on the CPU), T and max|M - I| as fused passes
//   kfac_precondition_eigen  four GEMMs with the division by dG dA^T + damping fused in place
//   kron_factor_update_  one baddbmm (addmm) into F, then an in-place symmetrisation pass
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../kron.h"

namespace soo {

// ---- argument checks (shared with CUDA) ---------------------------------------------------------

namespace {

bool is_float(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

}  // namespace

void check_kron_square(const char* op, const at::Tensor& A) {
  TORCH_CHECK(A.dim() >= 2 && A.size(-1) == A.size(-2), op,
              ": A must be a [..., n, n] stack of square matrices, got shape ", A.sizes());
  TORCH_CHECK(is_float(A), op, ": A must be float32 or float64, got ", A.scalar_type());
}

void check_kron_factor_update_args(const at::Tensor& F, const at::Tensor& X) {
  const char* op = "kron_factor_update_";
  TORCH_CHECK(F.dim() >= 2 && F.size(-1) == F.size(-2), op,
              ": F must be a [..., d, d] stack of square matrices, got shape ", F.sizes());
  TORCH_CHECK(is_float(F), op, ": F must be float32 or float64, got ", F.scalar_type());
  TORCH_CHECK(X.dim() == F.dim() && X.sizes().slice(0, X.dim() - 2) == F.sizes().slice(0, F.dim() - 2)
                  && X.size(-1) == F.size(-1),
              op, ": X must be [..., N, d] with F's leading dims and d = ", F.size(-1),
              ", got F ", F.sizes(), " and X ", X.sizes());
  const auto xt = X.scalar_type();
  TORCH_CHECK(xt == F.scalar_type() || xt == at::kBFloat16 || xt == at::kHalf
                  || (xt == at::kFloat && F.scalar_type() == at::kDouble),
              op, ": X must have F's dtype or a lower-precision float dtype, got ", xt, " with F ",
              F.scalar_type());
  TORCH_CHECK(X.device() == F.device(), op, ": X is on ", X.device(), ", F on ", F.device());
}

void check_kron_inverse_root_args(const at::Tensor& A, int64_t p, double epsilon,
                                  const std::string& method, int64_t max_iters, double tol) {
  const char* op = "kron_inverse_root";
  check_kron_square(op, A);
  TORCH_CHECK(p >= 1, op, ": p must be >= 1, got ", p);
  TORCH_CHECK(epsilon >= 0 && std::isfinite(epsilon), op, ": epsilon must be finite and >= 0, got ",
              epsilon);
  TORCH_CHECK(method == "newton" || method == "eigh", op,
              ": method must be 'newton' or 'eigh', got '", method, "'");
  TORCH_CHECK(max_iters >= 0, op, ": max_iters must be >= 0, got ", max_iters);
  TORCH_CHECK(tol >= 0, op, ": tol must be >= 0, got ", tol);
}

void check_kfac_precondition_args(const at::Tensor& grad, const at::Tensor& QG,
                                  const at::Tensor& dG, const at::Tensor& QA,
                                  const at::Tensor& dA) {
  const char* op = "kfac_precondition_eigen";
  TORCH_CHECK(grad.dim() >= 2, op, ": grad must be [..., o, i], got shape ", grad.sizes());
  TORCH_CHECK(is_float(grad), op, ": grad must be float32 or float64, got ", grad.scalar_type());
  const int64_t o = grad.size(-2), i = grad.size(-1), nb = grad.dim() - 2;
  const auto batch = grad.sizes().slice(0, nb);
  auto shaped = [&](const at::Tensor& t, std::initializer_list<int64_t> tail) {
    if (t.dim() != nb + static_cast<int64_t>(tail.size())) return false;
    if (t.sizes().slice(0, nb) != batch) return false;
    int64_t k = nb;
    for (int64_t s : tail)
      if (t.size(k++) != s) return false;
    return true;
  };
  TORCH_CHECK(shaped(QG, {o, o}) && shaped(dG, {o}) && shaped(QA, {i, i}) && shaped(dA, {i}), op,
              ": with grad ", grad.sizes(), " QG must be [..., ", o, ", ", o, "], dG [..., ", o,
              "], QA [..., ", i, ", ", i, "], dA [..., ", i, "]; got ", QG.sizes(), ", ",
              dG.sizes(), ", ", QA.sizes(), ", ", dA.sizes());
  for (const at::Tensor* t : {&QG, &dG, &QA, &dA}) {
    TORCH_CHECK(t->scalar_type() == grad.scalar_type(), op, ": all tensors must have grad's dtype ",
                grad.scalar_type(), ", got ", t->scalar_type());
    TORCH_CHECK(t->device() == grad.device(), op, ": all tensors must be on ", grad.device(),
                ", got ", t->device());
  }
}

namespace {

// A bucket of several matrices is always spread over the threads (one chunk per thread, LAPACK
// single-threaded inside: OpenMP does not nest).  Measured on the 2-core EPYC (2 threads, other
// jobs running): MKL's threaded potri took 3.9 s for ONE 1153 x 1153 float32 matrix (0.11 s for
// its Cholesky), MKL-threaded syevd was 10-100x slower than single-threaded, while 3 x 1153
// inverses over the threads took 0.19 s.  SOO_KRON_PAR_MAX_N (rows) limits the spreading (for
// tuning).
int64_t par_max_n() {
  static const int64_t value = [] {
    const char* env = std::getenv("SOO_KRON_PAR_MAX_N");
    return env ? std::atoll(env) : std::numeric_limits<int64_t>::max();
  }();
  return value;
}

bool spread_over_threads(int64_t B, int64_t n) {
  return B > 1 && n <= par_max_n() && at::get_num_threads() > 1 && !at::in_parallel_region();
}

// fn(b0, b1) over the B matrices of a bucket, split over the threads (see above).
template <typename Fn>
void for_matrices(int64_t B, int64_t n, const Fn& fn) {
  if (B == 0) return;
  if (spread_over_threads(B, n)) {
    at::parallel_for(0, B, 1, fn);
  } else {
    fn(0, B);
  }
}

// [..., n, n] -> contiguous [B, n, n] (a view when A is contiguous).
at::Tensor as_stack(const at::Tensor& A) {
  const int64_t n = A.size(-1);
  return A.reshape({-1, n, n}).contiguous();
}

template <typename T>
bool all_finite(const T* p, int64_t count) {
  bool ok = true;
  for (int64_t i = 0; i < count; ++i) ok &= std::isfinite(p[i]);
  return ok;
}

template <typename T>
void set_identity(T* p, int64_t n) {
  std::fill(p, p + n * n, T(0));
  for (int64_t i = 0; i < n; ++i) p[i * n + i] = T(1);
}

// out = A + shift I for a contiguous [m, n, n] block (one pass); with `finite`, also whether
// each matrix of A is all finite.
template <typename T>
void damped_copy(const T* A, T* out, int64_t m, int64_t n, T shift, char* finite = nullptr) {
  for (int64_t b = 0; b < m; ++b) {
    const T* a = A + b * n * n;
    T* o = out + b * n * n;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) o[i * n + j] = a[i * n + j];
      o[i * n + i] = a[i * n + i] + shift;
    }
    if (finite) finite[b] = all_finite(a, n * n);  // the matrix is still in cache
  }
}

void symmetrize_(const at::Tensor& F3);

// ---- kron_damped_inverse -----------------------------------------------------------------------

// float64 retry of one matrix with damping' = 10 damping + eps32 |tr A| / n; true when it worked.
template <typename T>
bool damped_inverse_retry(const at::Tensor& A, double damping, T* out) {
  const int64_t n = A.size(-1);
  at::Tensor A64 = A.to(at::kDouble).contiguous();
  const double* a = A64.const_data_ptr<double>();
  double trace = 0;
  for (int64_t i = 0; i < n; ++i) trace += a[i * n + i];
  const double shift = 10.0 * damping + kKronEps32 * std::abs(trace) / std::max<int64_t>(n, 1);
  at::Tensor M = at::empty_like(A64);
  damped_copy(a, M.data_ptr<double>(), 1, n, shift);
  auto [L, info] = at::linalg_cholesky_ex(M, false, false);
  if (info.item<int32_t>() != 0) return false;
  at::Tensor X = at::cholesky_inverse(L).to(A.scalar_type()).contiguous();
  if (!all_finite(X.const_data_ptr<T>(), n * n)) return false;
  std::copy_n(X.const_data_ptr<T>(), n * n, out);
  return true;
}

template <typename T>
void damped_inverse_chunk(const at::Tensor& A, double damping, const at::Tensor& X,
                          int32_t* status) {
  const int64_t m = A.size(0), n = A.size(-1), nn = n * n;
  // The damped factor is symmetric, so its row-major buffer read as column-major (.mT()) is the
  // same matrix: LAPACK gets it and returns L and X in column-major order without the
  // transposing copies a row-major argument costs (1.1-1.25x on a bucket of 1153 x 1153 float32
  // factors, 1 thread).
  at::Tensor M = at::empty_like(A);
  std::vector<char> finite(m);
  damped_copy(A.const_data_ptr<T>(), M.data_ptr<T>(), m, n, static_cast<T>(damping),
              finite.data());
  auto [L, info] = at::linalg_cholesky_ex(M.mT(), false, false);
  const int32_t* inf = info.const_data_ptr<int32_t>();
  if (!L.mT().is_contiguous()) L = L.mT().contiguous().mT();
  for (int64_t b = 0; b < m; ++b)  // cholesky_inverse of a failed partial factor: invert I there
    if (inf[b] != 0) set_identity(L.data_ptr<T>() + b * nn, n);
  at::Tensor Xo = X.mT();  // the contiguous output slice, column-major (X is symmetric)
  if (at::in_parallel_region() || at::get_num_threads() == 1) {
    at::cholesky_inverse_out(Xo, L);  // potri, single-threaded here
  } else {
    // LAPACK may thread: potrs (two trsm) instead of the threaded potri (see par_max_n)
    at::cholesky_solve_out(Xo, at::eye(n, A.options()).expand({m, n, n}), L);
    symmetrize_(X);
  }
  TORCH_INTERNAL_ASSERT(Xo.data_ptr() == X.data_ptr());
  T* out = X.data_ptr<T>();
  for (int64_t b = 0; b < m; ++b) {
    T* ob = out + b * nn;
    if (!finite[b]) {  // (Cholesky reads one triangle only)
      std::fill(ob, ob + nn, T(0));
      status[b] = kKronFailed;
    } else if (inf[b] == 0 && all_finite(ob, nn)) {
      status[b] = kKronOk;
    } else if (damped_inverse_retry<T>(A[b], damping, ob)) {
      status[b] = kKronFallback;
    } else {
      std::fill(ob, ob + nn, T(0));
      status[b] = kKronFailed;
    }
  }
}

std::tuple<at::Tensor, at::Tensor> kron_damped_inverse_cpu(const at::Tensor& A, double damping) {
  check_kron_square("kron_damped_inverse", A);
  const int64_t n = A.size(-1);
  at::Tensor A3 = as_stack(A);
  const int64_t B = A3.size(0);
  at::Tensor X = at::empty_like(A3);
  at::Tensor status = at::empty({B}, A.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "kron_damped_inverse_cpu", [&] {
    int32_t* st = status.data_ptr<int32_t>();
    for_matrices(B, n, [&](int64_t b0, int64_t b1) {
      damped_inverse_chunk<scalar_t>(A3.narrow(0, b0, b1 - b0), damping,
                                     X.narrow(0, b0, b1 - b0), st + b0);
    });
  });
  const auto batch = A.sizes().slice(0, A.dim() - 2);
  return {X.view(A.sizes()), status.view(batch)};
}

// ---- kron_eigh ---------------------------------------------------------------------------------

// eigh of one matrix in `dtype`, nullopt when LAPACK fails or the result is not finite.
std::optional<std::pair<at::Tensor, at::Tensor>> eigh_one(const at::Tensor& A, at::ScalarType dtype) {
  at::Tensor d, Q;
  try {
    std::tie(d, Q) = at::linalg_eigh(A.to(dtype));
  } catch (const c10::Error&) {  // LinAlgError: did not converge
    return std::nullopt;
  }
  if (!d.isfinite().all().item<bool>() || !Q.isfinite().all().item<bool>()) return std::nullopt;
  return std::make_pair(d, Q);
}

// d [m, n], Q [m, n, n] (contiguous outputs) and status of a contiguous chunk A [m, n, n].
template <typename T>
void eigh_chunk(const at::Tensor& A, const at::Tensor& d, const at::Tensor& Q, int32_t* status) {
  const int64_t m = A.size(0), n = A.size(-1), nn = n * n;
  const T* a = A.const_data_ptr<T>();
  std::vector<char> finite(m);
  bool all_fin = true;
  for (int64_t b = 0; b < m; ++b) all_fin &= (finite[b] = all_finite(a + b * nn, nn));
  at::Tensor Ain = A;
  if (!all_fin) {  // a non-finite matrix fails without a LAPACK call: I in its place
    Ain = A.clone();
    for (int64_t b = 0; b < m; ++b)
      if (!finite[b]) set_identity(Ain.data_ptr<T>() + b * nn, n);
  }
  T* dp = d.data_ptr<T>();
  T* qp = Q.data_ptr<T>();
  bool batched = true;
  try {
    at::Tensor dd, QQ;
    std::tie(dd, QQ) = at::linalg_eigh(Ain);
    d.copy_(dd.view(d.sizes()));
    Q.copy_(QQ.view(Q.sizes()));
  } catch (const c10::Error&) {
    batched = false;  // some matrix did not converge: one at a time below
  }
  for (int64_t b = 0; b < m; ++b) {
    T* db = dp + b * n;
    T* qb = qp + b * nn;
    status[b] = kKronFailed;
    if (finite[b]) {
      if (batched && all_finite(db, n) && all_finite(qb, nn)) {
        status[b] = kKronOk;
      } else {
        for (auto [code, dtype] : {std::make_pair(kKronOk, A.scalar_type()),
                                   std::make_pair(kKronFallback, at::kDouble)}) {
          if (batched && code == kKronOk) continue;  // the batched call already tried it
          if (auto r = eigh_one(Ain[b], dtype)) {
            d[b].copy_(r->first);
            Q[b].copy_(r->second);
            status[b] = code;
            break;
          }
        }
      }
    }
    if (status[b] == kKronFailed) {
      std::fill(db, db + n, T(0));
      set_identity(qb, n);
    }
    for (int64_t i = 0; i < n; ++i) db[i] = db[i] < T(0) ? T(0) : db[i];  // clamp >= 0
  }
}

// Runs eigh_chunk over a contiguous stack; returns d [B, n], Q [B, n, n], status [B].
std::tuple<at::Tensor, at::Tensor, at::Tensor> eigh_stack(const at::Tensor& A3) {
  const int64_t B = A3.size(0), n = A3.size(-1);
  at::Tensor d = at::empty({B, n}, A3.options());
  at::Tensor Q = at::empty_like(A3);
  at::Tensor status = at::empty({B}, A3.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(A3.scalar_type(), "kron_eigh_cpu", [&] {
    int32_t* st = status.data_ptr<int32_t>();
    for_matrices(B, n, [&](int64_t b0, int64_t b1) {
      eigh_chunk<scalar_t>(A3.narrow(0, b0, b1 - b0), d.narrow(0, b0, b1 - b0),
                           Q.narrow(0, b0, b1 - b0), st + b0);
    });
  });
  return {d, Q, status};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_eigh_cpu(const at::Tensor& A) {
  check_kron_square("kron_eigh", A);
  auto [d, Q, status] = eigh_stack(as_stack(A));
  const auto batch = A.sizes().slice(0, A.dim() - 2);
  std::vector<int64_t> dshape(batch.begin(), batch.end());
  dshape.push_back(A.size(-1));
  return {d.view(dshape), Q.view(A.sizes()), status.view(batch)};
}

// ---- kron_inverse_root -------------------------------------------------------------------------

// X = W W^T with W = Q diag((l - min(l_min, 0) + eps)^{-1/(2p)}) (W = 0 for a failed matrix, so
// X = 0 there), for a chunk of m matrices.
template <typename T>
void root_from_eigh_chunk(const at::Tensor& d, const at::Tensor& Q, const int32_t* status,
                          int64_t p, double eps, const at::Tensor& X) {
  const int64_t m = Q.size(0), n = Q.size(-1), nn = n * n;
  at::Tensor W = at::empty_like(Q);
  const T* dp = d.const_data_ptr<T>();
  const T* qp = Q.const_data_ptr<T>();
  T* wp = W.data_ptr<T>();
  std::vector<T> w(n);
  const T expo = static_cast<T>(-1.0 / (2.0 * static_cast<double>(p)));
  for (int64_t b = 0; b < m; ++b) {
    const T* db = dp + b * n;
    T dmin = n ? *std::min_element(db, db + n) : T(0);
    dmin = dmin < T(0) ? dmin : T(0);
    for (int64_t j = 0; j < n; ++j)
      w[j] = status[b] == kKronFailed ? T(0) : std::pow(db[j] - dmin + static_cast<T>(eps), expo);
    const T* qb = qp + b * nn;
    T* wb = wp + b * nn;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) wb[i * n + j] = qb[i * n + j] * w[j];
  }
  at::Tensor Xo = X;  // a contiguous slice of the output
  at::matmul_out(Xo, W, W.mT());
}

// The coupled Newton iteration for one matrix (see the reference); writes X, returns the status.
template <typename T>
int32_t newton_one(const at::Tensor& A, int64_t p, double eps, int64_t max_iters, double tol,
                   T* out) {
  const int64_t n = A.size(-1), nn = n * n;
  at::Tensor Bm = at::empty_like(A);
  damped_copy(A.const_data_ptr<T>(), Bm.data_ptr<T>(), 1, n, static_cast<T>(eps));
  const T* bp = Bm.const_data_ptr<T>();
  double ss = 0;
  for (int64_t i = 0; i < nn; ++i) ss += static_cast<double>(bp[i]) * bp[i];
  const T z = static_cast<T>((p + 1) / (2 * std::sqrt(ss)));
  at::Tensor X = at::zeros_like(A), M = at::empty_like(A), Tm = at::empty_like(A);
  {
    T* x = X.data_ptr<T>();
    const T x0 = std::pow(z, static_cast<T>(1.0 / static_cast<double>(p)));
    for (int64_t i = 0; i < n; ++i) x[i * n + i] = x0;
    T* mp = M.data_ptr<T>();
    for (int64_t i = 0; i < nn; ++i) mp[i] = z * bp[i];
  }
  auto err_of = [n](const at::Tensor& Mt) {  // max |M - I| (NaN propagates)
    const T* mp = Mt.const_data_ptr<T>();
    T e = 0;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t j = 0; j < n; ++j) {
        const T v = std::abs(mp[i * n + j] - (i == j ? T(1) : T(0)));
        e = (v > e || std::isnan(v)) ? v : e;
      }
    return e;
  };
  T err = err_of(M);
  const T tol_t = static_cast<T>(tol), growth = static_cast<T>(kKronNewtonGrowth);
  const T pp1 = static_cast<T>(p + 1), pt = static_cast<T>(p);
  bool active = err > tol_t;
  for (int64_t it = 0; active && it < max_iters; ++it) {
    {  // T = ((p + 1) I - M) / p
      const T* mp = M.const_data_ptr<T>();
      T* tp = Tm.data_ptr<T>();
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j)
          tp[i * n + j] = ((i == j ? pp1 : T(0)) - mp[i * n + j]) / pt;
    }
    at::Tensor Xn = at::mm(X, Tm);
    // T^p by binary powering, as torch.linalg.matrix_power
    at::Tensor result, base = Tm;
    for (int64_t e = p; e > 0;) {
      if (e & 1) result = result.defined() ? at::mm(result, base) : base;
      e >>= 1;
      if (e) base = at::mm(base, base);
    }
    at::Tensor Mn = at::mm(result, M);
    const T en = err_of(Mn);
    if (!(en <= growth * err)) break;  // grew (or NaN): keep the last X
    X = Xn;
    M = Mn;
    err = en;
    active = en > tol_t;
  }
  const T* xp = X.const_data_ptr<T>();
  if (!all_finite(xp, nn)) {
    std::fill(out, out + nn, T(0));
    return kKronFailed;
  }
  std::copy_n(xp, nn, out);
  return err <= tol_t ? kKronOk : kKronFallback;
}

std::tuple<at::Tensor, at::Tensor> kron_inverse_root_cpu(const at::Tensor& A, int64_t p,
                                                         double epsilon, c10::string_view method,
                                                         int64_t max_iters, double tol) {
  const std::string meth(method.data(), method.size());
  check_kron_inverse_root_args(A, p, epsilon, meth, max_iters, tol);
  const int64_t n = A.size(-1);
  at::Tensor A3 = as_stack(A);
  const int64_t B = A3.size(0);
  at::Tensor X = at::empty_like(A3);
  at::Tensor status = at::empty({B}, A.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "kron_inverse_root_cpu", [&] {
    int32_t* st = status.data_ptr<int32_t>();
    if (meth == "eigh") {
      at::Tensor d = at::empty({B, n}, A3.options()), Q = at::empty_like(A3);
      for_matrices(B, n, [&](int64_t b0, int64_t b1) {
        const int64_t m = b1 - b0;
        at::Tensor dc = d.narrow(0, b0, m), Qc = Q.narrow(0, b0, m);
        eigh_chunk<scalar_t>(A3.narrow(0, b0, m), dc, Qc, st + b0);
        root_from_eigh_chunk<scalar_t>(dc, Qc, st + b0, p, epsilon, X.narrow(0, b0, m));
      });
    } else {
      scalar_t* xp = X.data_ptr<scalar_t>();
      for_matrices(B, n, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          st[b] = newton_one<scalar_t>(A3[b], p, epsilon, max_iters, tol, xp + b * n * n);
      });
    }
  });
  const auto batch = A.sizes().slice(0, A.dim() - 2);
  return {X.view(A.sizes()), status.view(batch)};
}

// ---- kfac_precondition_eigen -------------------------------------------------------------------

at::Tensor kfac_precondition_eigen_cpu(const at::Tensor& grad, const at::Tensor& QG,
                                       const at::Tensor& dG, const at::Tensor& QA,
                                       const at::Tensor& dA, double damping) {
  check_kfac_precondition_args(grad, QG, dG, QA, dA);
  const int64_t o = grad.size(-2), i = grad.size(-1);
  at::Tensor inner = at::matmul(at::matmul(QG.mT(), grad), QA).contiguous();
  at::Tensor dGc = dG.contiguous(), dAc = dA.contiguous();
  const int64_t B = (o > 0 && i > 0) ? inner.numel() / (o * i) : 0;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "kfac_precondition_eigen_cpu", [&] {
    scalar_t* ip = inner.data_ptr<scalar_t>();
    const scalar_t* gp = dGc.const_data_ptr<scalar_t>();
    const scalar_t* ap = dAc.const_data_ptr<scalar_t>();
    const scalar_t lam = static_cast<scalar_t>(damping);
    at::parallel_for(0, B * o, std::max<int64_t>(1, 16384 / std::max<int64_t>(i, 1)),
                     [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {  // row r = (matrix b, row k)
        const int64_t b = r / o;
        const scalar_t g = gp[r];
        const scalar_t* a = ap + b * i;
        scalar_t* row = ip + r * i;
        for (int64_t j = 0; j < i; ++j) row[j] = row[j] / (g * a[j] + lam);
      }
    });
  });
  return at::matmul(at::matmul(QG, inner), QA.mT());
}

// ---- kron_factor_update_ -----------------------------------------------------------------------

// F <- (F + F^T) / 2 in place for a contiguous [B, d, d] stack (both halves get one value).
void symmetrize_(const at::Tensor& F3) {
  const int64_t B = F3.size(0), d = F3.size(-1);
  AT_DISPATCH_FLOATING_TYPES(F3.scalar_type(), "kron_symmetrize_cpu", [&] {
    scalar_t* f = F3.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(d * d, 1));
    at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        scalar_t* m = f + b * d * d;
        for (int64_t i = 0; i < d; ++i)
          for (int64_t j = i + 1; j < d; ++j) {
            const scalar_t v = (m[i * d + j] + m[j * d + i]) * scalar_t(0.5);
            m[i * d + j] = v;
            m[j * d + i] = v;
          }
      }
    });
  });
}

void kron_factor_update_cpu(const at::Tensor& F, const at::Tensor& X, double decay, double scale) {
  check_kron_factor_update_args(F, X);
  const int64_t d = F.size(-1), N = X.size(-2);
  at::Tensor F3 = F.is_contiguous() ? F.view({-1, d, d}) : F.contiguous().view({-1, d, d});
  at::Tensor X3 = X.reshape({-1, N, d}).to(F.scalar_type());
  if (F3.size(0) == 1) {
    at::Tensor F2 = F3[0], X2 = X3[0];
    F2.addmm_(X2.mT(), X2, decay, scale);
  } else {
    F3.baddbmm_(X3.mT(), X3, decay, scale);
  }
  symmetrize_(F3);
  if (!F.is_contiguous()) const_cast<at::Tensor&>(F).copy_(F3.view(F.sizes()));
}

}  // namespace

TORCH_LIBRARY_IMPL(soo, CPU, m) {
  m.impl("kron_factor_update_", &kron_factor_update_cpu);
  m.impl("kron_damped_inverse", &kron_damped_inverse_cpu);
  m.impl("kron_eigh", &kron_eigh_cpu);
  m.impl("kron_inverse_root", &kron_inverse_root_cpu);
  m.impl("kfac_precondition_eigen", &kfac_precondition_eigen_cpu);
}

}  // namespace soo
