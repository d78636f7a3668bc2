// Windows of vectors (GGT, M-FAC, Woodbury natural gradient): the shared declarations of the CPU
// and CUDA kernels of
//
//   window_gram:    D = W[:rows] X^T (k <= 8 vectors, one streaming pass over the window) and,
//                   with full, G = W[:rows] W[:rows]^T (column chunks widened to float64, one
//                   float64 GEMM each); float64 results [m, k] / [m, m], zero beyond rows
//   window_combine: out <- base_coef base + sum_{i < rows} coef[i] W[i] (one pass, float64 sums)
//
// W is [m, n], float32 or bfloat16 with float32 vectors, float64 with float64 ones.  coef and
// base_coef are float64 device tensors: no host sync.  Contracts: soo_ext/reference.py.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>
#include <vector>

namespace soo {

constexpr int64_t kWindowMaxVectors = 8;

void check_window_gram_args(const at::Tensor& W, at::TensorList X, int64_t rows);
void check_window_combine_args(const at::Tensor& out, const at::Tensor& W, const at::Tensor& coef,
                               int64_t rows, const std::optional<at::Tensor>& base,
                               const std::optional<at::Tensor>& base_coef);

// The outputs of window_gram, zeroed: G [m, m] (or [0, 0]) and D [m, k], float64.
std::tuple<at::Tensor, at::Tensor> window_gram_outputs(const at::Tensor& W, int64_t k, bool full);

// G[:rows, :rows] <- W[:rows] W[:rows]^T by float64 GEMMs over column chunks (at::mm on W's
// device: BLAS on the CPU, cuBLAS on CUDA), upper triangle mirrored: exactly symmetric.
void window_gram_full(const at::Tensor& W, int64_t rows, at::Tensor& G);

// Calls fn(TW{}, TV{}) for the window's dtype TW and its vectors' TV (float64 / float64,
// float32 / float32, bfloat16 / float32): the storages the checks above admit.
template <typename F>
void dispatch_window(at::ScalarType window, F&& fn) {
  if (window == at::kDouble) {
    fn(double{}, double{});
  } else if (window == at::kFloat) {
    fn(float{}, float{});
  } else {
    fn(c10::BFloat16{}, float{});
  }
}

}  // namespace soo
