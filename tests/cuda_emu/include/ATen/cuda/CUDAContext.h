// cuda_emu stand-in for ATen/cuda/CUDAContext.h: the current stream is a token, the device
// properties are the emulated device's (tests/cuda_emu/cuda_emu.h).  Internal linkage: torch's
// own at::cuda functions (libtorch_cuda) must not be called instead, nor these instead of them.
#pragma once
#include "../../../cuda_emu.h"

namespace at::cuda {
namespace {
struct CUDAStream {};
inline CUDAStream getCurrentCUDAStream() { return {}; }
inline cudaDeviceProp* getCurrentDeviceProperties() { return &::soo_emu::state().prop; }
}  // namespace
}  // namespace at::cuda
