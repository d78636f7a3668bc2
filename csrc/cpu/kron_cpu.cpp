// CPU kernels of the Kronecker-factor ops (csrc/kron.h) and the argument checks shared with CUDA.
//
// A bucket [B, n, n] of B >= 2 factors is cut into one contiguous range of matrices per intra-op
// thread (at::parallel_for); each range calls LAPACK/BLAS one matrix at a time, single-threaded
// inside (OpenMP does not nest), so the threads never wait on each other inside one
// factorisation.  A bucket of one matrix is one range and LAPACK/BLAS thread inside it.  On the
// CPU a failure is known at once (info and finiteness are host values), so only the matrices
// that failed are retried in float64.
//
//   kron_damped_inverse  per matrix, in the output buffer: damping added while copying (with the
//                        finiteness test), potrf + potri (~n^3 flops against ~2n^3 for the LU
//                        inverse, getrf + getri, of torch.linalg.inv), the other triangle
//                        mirrored (with the finiteness test)
//   kron_eigh            per matrix: copy with the finiteness test, syevd (workspace shared by the
//                        range), eigenvectors transposed into columns, float64 retry
//   kron_inverse_root    eigh: as kron_eigh but the eigenvectors stay rows P, scaled in place by
//                        (l + eps)^{-1/(2p)} (V), X = V^T V (one GEMM per range); newton: the
//                        coupled iteration per matrix, each matrix stopping on its own (checked
//                        every iteration: no sync cost on the CPU), T and max|M - I| fused
//   kfac_precondition_eigen  four GEMMs with the division by dG dA^T + damping fused in place
//   kron_factor_update_  one baddbmm (addmm) into F, then an in-place symmetrisation pass
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/BatchLinearAlgebra.h>
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

#if !AT_BUILD_WITH_LAPACK()
#error "soo_ext: the CPU factor kernels call the LAPACK torch is built with; this torch has none"
#endif

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

// A bucket of several matrices is always spread over the threads (one range per thread, LAPACK
// single-threaded inside: OpenMP does not nest).  Measured on the 2-core EPYC (2 threads, other
// jobs running): MKL-threaded syevd was 10-100x slower than single-threaded and MKL's threaded
// potri took 3.9 s for one 1153 x 1153 float32 matrix, while 3 x 1153 inverses over the threads
// took 0.19 s.  (On the Intel Xeon threaded potri is fine: 9.3 ms at 2 threads, 11.9 ms at 1.)
// SOO_KRON_PAR_MAX_N (rows) limits the spreading (for tuning).
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
  return A.reshape({stack_count(A), n, n}).contiguous();
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

// out = in^T for row-major n x n matrices (in tiles: one side strides n).
template <typename T>
void transpose_copy(const T* in, T* out, int64_t n) {
  constexpr int64_t tile = 32;
  for (int64_t i0 = 0; i0 < n; i0 += tile)
    for (int64_t j0 = 0; j0 < n; j0 += tile)
      for (int64_t i = i0; i < std::min(i0 + tile, n); ++i)
        for (int64_t j = j0; j < std::min(j0 + tile, n); ++j) out[j * n + i] = in[i * n + j];
}

// out = A + shift I for a contiguous [m, n, n] block (one pass); with `finite`, also whether
// each matrix of A is all finite.
template <typename T, typename U>
void damped_copy(const T* A, U* out, int64_t m, int64_t n, U shift, char* finite = nullptr) {
  for (int64_t b = 0; b < m; ++b) {
    const T* a = A + b * n * n;
    U* o = out + b * n * n;
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) o[i * n + j] = a[i * n + j];
      o[i * n + i] = a[i * n + i] + shift;
    }
    if (finite) finite[b] = all_finite(a, n * n);  // the matrix is still in cache
  }
}

// ---- LAPACK on one matrix ----------------------------------------------------------------------
//
// The ops call the LAPACK torch is built with (at::native::lapack*, MKL in the x86 wheels) on one
// matrix at a time, in the op's own buffers: ATen's batched calls copy every input into a fresh
// column-major buffer, zero a triangle, copy the result back and scan it again, which cost ~40%
// of the damped inverse of a 1153 x 1153 float32 factor (1 thread, Intel Xeon).  A row-major
// buffer read as column-major is the transpose, so uplo 'U' makes LAPACK read (and potri write)
// the row-major lower triangle, the one torch.linalg reads.

constexpr char kRowMajorLower = 'U';

int lapack_int(int64_t n) {
  TORCH_CHECK(n <= std::numeric_limits<int>::max(), "kron ops: matrix size ", n,
              " exceeds LAPACK's 32-bit indices");
  return static_cast<int>(n);
}

// x[j, i] = x[i, j] for i > j (lower triangle copied to the upper, in tiles: the writes stride n);
// returns whether the lower triangle is all finite.
template <typename T>
bool mirror_lower_(T* x, int64_t n) {
  constexpr int64_t tile = 32;
  bool finite = true;
  for (int64_t i0 = 0; i0 < n; i0 += tile)
    for (int64_t j0 = 0; j0 <= i0; j0 += tile)
      for (int64_t i = i0; i < std::min(i0 + tile, n); ++i)
        for (int64_t j = j0; j < std::min({j0 + tile, i + 1}); ++j) {
          const T v = x[i * n + j];
          finite &= std::isfinite(v);
          x[j * n + i] = v;
        }
  return finite;
}

// x <- x^{-1} for a symmetric positive-definite row-major n x n matrix (potrf + potri on its lower
// triangle, then mirrored); false when the factorisation fails or the inverse is not finite.
template <typename T>
bool spd_inverse_(T* x, int64_t n) {
  const int ni = lapack_int(n);
  int info = 0;
  const int lda = std::max(ni, 1);
  at::native::lapackCholesky<T>(kRowMajorLower, ni, x, lda, &info);
  if (info == 0) at::native::lapackCholeskyInverse<T>(kRowMajorLower, ni, x, lda, &info);
  return info == 0 && mirror_lower_(x, n);
}

// syevd of symmetric n x n matrices with one workspace (sized by LAPACK's query) for all of them.
template <typename T>
class Syevd {
 public:
  explicit Syevd(int64_t n) : n_(lapack_int(n)) {
    T work_size = 0, dummy = 0;
    int iwork_size = 0;
    call(&dummy, &dummy, &work_size, -1, &iwork_size, -1);  // the workspace query
    work_.resize(std::max<int64_t>(1, static_cast<int64_t>(work_size)));
    iwork_.resize(std::max(1, iwork_size));
  }

  // x (row-major, lower triangle read) -> ascending eigenvalues in w, eigenvectors as the ROWS
  // of x; false when LAPACK does not converge or a result is not finite.
  bool operator()(T* x, T* w) {
    const int info = call(x, w, work_.data(), static_cast<int>(work_.size()), iwork_.data(),
                          static_cast<int>(iwork_.size()));
    return info == 0 && all_finite(w, n_) && all_finite(x, int64_t(n_) * n_);
  }

 private:
  int call(T* x, T* w, T* work, int lwork, int* iwork, int liwork) const {
    int info = 0;
    at::native::lapackSyevd<T, T>('V', kRowMajorLower, n_, x, std::max(n_, 1), w, work, lwork,
                                  /*rwork=*/static_cast<T*>(nullptr), 0, iwork, liwork, &info);
    return info;
  }

  int n_;
  std::vector<T> work_;
  std::vector<int> iwork_;
};

// ---- kron_damped_inverse -----------------------------------------------------------------------

// float64 retry of one matrix with damping' = 10 damping + eps32 |tr A| / n; true when it worked.
template <typename T>
bool damped_inverse_retry(const T* a, int64_t n, double damping, T* out) {
  double trace = 0;
  for (int64_t i = 0; i < n; ++i) trace += a[i * n + i];
  const double shift = 10.0 * damping + kKronEps32 * std::abs(trace) / std::max<int64_t>(n, 1);
  std::vector<double> x(n * n);
  damped_copy(a, x.data(), 1, n, shift);
  if (!spd_inverse_(x.data(), n)) return false;
  std::copy(x.begin(), x.end(), out);
  return all_finite(out, n * n);  // a finite float64 inverse can overflow float32
}

// X[b] = (A[b] + damping I)^{-1} for the matrices b0 <= b < b1 of contiguous stacks, computed in
// place in X (one copy in, potrf, potri, one mirroring pass out).
template <typename T>
void damped_inverse_range(const T* A, T* X, int64_t n, double damping, int64_t b0, int64_t b1,
                          int32_t* status) {
  const int64_t nn = n * n;
  for (int64_t b = b0; b < b1; ++b) {
    const T* a = A + b * nn;
    T* x = X + b * nn;
    char finite = 0;
    damped_copy(a, x, 1, n, static_cast<T>(damping), &finite);
    if (!finite) {  // fails without a LAPACK call (Cholesky would read one triangle only)
      status[b] = kKronFailed;
    } else if (spd_inverse_(x, n)) {
      status[b] = kKronOk;
    } else if (damped_inverse_retry(a, n, damping, x)) {
      status[b] = kKronFallback;
    } else {
      status[b] = kKronFailed;
    }
    if (status[b] == kKronFailed) std::fill(x, x + nn, T(0));
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
    const scalar_t* a = A3.const_data_ptr<scalar_t>();
    scalar_t* x = X.data_ptr<scalar_t>();
    int32_t* st = status.data_ptr<int32_t>();
    for_matrices(B, n, [&](int64_t b0, int64_t b1) {
      damped_inverse_range(a, x, n, damping, b0, b1, st);
    });
  });
  const auto batch = A.sizes().slice(0, A.dim() - 2);
  return {X.view(A.sizes()), status.view(batch)};
}

// ---- kron_eigh ---------------------------------------------------------------------------------

// Eigendecompositions of the matrices b0 <= b < b1 of the contiguous stack A: d [B, n] ascending
// and clamped >= 0, and in P [B, n, n] the eigenvectors as ROWS (LAPACK's column-major output
// read row-major), or as columns with `columns` (one transposing pass).  A non-finite matrix
// fails without a LAPACK call; a failed float32 matrix is redone in float64.  Failed: d = 0,
// eigenvectors I.
template <typename T>
void eigh_range(const T* A, T* d, T* P, int64_t n, int64_t b0, int64_t b1, bool columns,
                int32_t* status) {
  const int64_t nn = n * n;
  Syevd<T> syevd(n);
  std::optional<Syevd<double>> syevd64;
  std::vector<T> rows(columns ? nn : 0);
  for (int64_t b = b0; b < b1; ++b) {
    const T* a = A + b * nn;
    T* db = d + b * n;
    T* pb = P + b * nn;
    T* x = columns ? rows.data() : pb;
    status[b] = kKronFailed;
    char finite = 0;
    damped_copy(a, x, 1, n, T(0), &finite);
    if (finite) {
      if (syevd(x, db)) {
        status[b] = kKronOk;
      } else {
        std::vector<double> x64(a, a + nn), w64(n);
        if (!syevd64) syevd64.emplace(n);
        if ((*syevd64)(x64.data(), w64.data())) {
          std::copy(x64.begin(), x64.end(), x);
          std::copy(w64.begin(), w64.end(), db);
          if (all_finite(x, nn) && all_finite(db, n)) status[b] = kKronFallback;
        }
      }
    }
    if (status[b] == kKronFailed) {
      std::fill(db, db + n, T(0));
      set_identity(pb, n);
    } else if (columns) {
      transpose_copy(x, pb, n);
    }
    for (int64_t i = 0; i < n; ++i) db[i] = db[i] < T(0) ? T(0) : db[i];
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kron_eigh_cpu(const at::Tensor& A) {
  check_kron_square("kron_eigh", A);
  const int64_t n = A.size(-1);
  at::Tensor A3 = as_stack(A);
  const int64_t B = A3.size(0);
  at::Tensor d = at::empty({B, n}, A3.options());
  at::Tensor Q = at::empty_like(A3);
  at::Tensor status = at::empty({B}, A3.options().dtype(at::kInt));
  AT_DISPATCH_FLOATING_TYPES(A3.scalar_type(), "kron_eigh_cpu", [&] {
    const scalar_t* a = A3.const_data_ptr<scalar_t>();
    scalar_t* dp = d.data_ptr<scalar_t>();
    scalar_t* qp = Q.data_ptr<scalar_t>();
    int32_t* st = status.data_ptr<int32_t>();
    for_matrices(B, n, [&](int64_t b0, int64_t b1) {
      eigh_range(a, dp, qp, n, b0, b1, /*columns=*/true, st);
    });
  });
  const auto batch = A.sizes().slice(0, A.dim() - 2);
  std::vector<int64_t> dshape(batch.begin(), batch.end());
  dshape.push_back(n);
  return {d.view(dshape), Q.view(A.sizes()), status.view(batch)};
}

// ---- kron_inverse_root -------------------------------------------------------------------------

// X = V^T V for the matrices b0 <= b < b1, V = diag(w) P with P's rows the eigenvectors and
// w = (d + eps)^{-1/(2p)} (d is clamped >= 0, so the reference's shift -min(l_min, 0) is 0;
// w = 0 for a failed matrix, so X = 0 there): scaling rows in place, then one GEMM.
template <typename T>
void root_from_eigh_range(const T* d, T* P, const int32_t* status, int64_t n, int64_t p,
                          double eps, int64_t b0, int64_t b1, const at::Tensor& P3,
                          const at::Tensor& X3) {
  const T expo = static_cast<T>(-1.0 / (2.0 * static_cast<double>(p)));
  for (int64_t b = b0; b < b1; ++b) {
    for (int64_t j = 0; j < n; ++j) {
      const T w = status[b] == kKronFailed ? T(0)
                                           : std::pow(d[b * n + j] + static_cast<T>(eps), expo);
      T* row = P + (b * n + j) * n;
      for (int64_t k = 0; k < n; ++k) row[k] *= w;
    }
  }
  at::Tensor V = P3.narrow(0, b0, b1 - b0);
  at::Tensor Xo = X3.narrow(0, b0, b1 - b0);  // a contiguous slice of the output
  at::matmul_out(Xo, V.mT(), V);
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
      at::Tensor d = at::empty({B, n}, A3.options()), P = at::empty_like(A3);
      const scalar_t* a = A3.const_data_ptr<scalar_t>();
      scalar_t* dp = d.data_ptr<scalar_t>();
      scalar_t* pp = P.data_ptr<scalar_t>();
      for_matrices(B, n, [&](int64_t b0, int64_t b1) {
        eigh_range(a, dp, pp, n, b0, b1, /*columns=*/false, st);
        root_from_eigh_range(dp, pp, st, n, p, epsilon, b0, b1, P, X);
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
  kron_factor_update(F, X, decay, scale, [](at::Tensor& F3) { symmetrize_(F3); });
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
