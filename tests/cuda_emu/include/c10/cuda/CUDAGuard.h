// cuda_emu stand-in for c10/cuda/CUDAGuard.h: one emulated device, nothing to switch (internal
// linkage, as in ATen/cuda/CUDAContext.h here).
#pragma once
#include <c10/core/Device.h>

namespace c10::cuda {
namespace {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace
}  // namespace c10::cuda
