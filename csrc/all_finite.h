// soo::all_finite(Tensor[] tensors) -> Tensor: a 0-dim bool on the tensors' device, true iff
// every element of every tensor is finite (the skip guard's check of a step).  Shared declarations
// of the CPU and CUDA kernels.
//
// The test is on the bits, the same for every float format: a value is an inf or a NaN iff all of
// its exponent bits are set.  So a kernel reads each tensor's storage once as unsigned integers of
// the element's width (no conversion: bfloat16 and float16 cost what their bytes cost), whatever
// the dtypes of the list, and never rounds anything.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace soo {

// Every tensor float64, float32, bfloat16 or float16, all on one device.  (The dispatcher refuses
// an empty list, which has no device to dispatch on: the result would have none either.)
void check_all_finite_args(at::TensorList tensors);

// The elements of t as one dense span: t itself when its elements fill a block of memory of
// numel elements from data_ptr() on (contiguous, or permuted without gaps: the order of a span
// does not matter here), else a contiguous copy (a strided view with gaps, an expanded tensor).
at::Tensor dense_span(const at::Tensor& t);

// Calls fn(Bits{}, mask) with the unsigned integer type of the dtype's width and its exponent
// mask: (bits & mask) == mask iff the value is an inf or a NaN.
template <typename F>
void dispatch_float_bits(at::ScalarType dtype, F&& fn) {
  switch (dtype) {
    case at::kDouble: fn(uint64_t{}, uint64_t{0x7ff0000000000000}); break;
    case at::kFloat: fn(uint32_t{}, uint32_t{0x7f800000}); break;
    case at::kBFloat16: fn(uint16_t{}, uint16_t{0x7f80}); break;
    default: fn(uint16_t{}, uint16_t{0x7c00}); break;  // float16 (the checks admit no other)
  }
}

}  // namespace soo
