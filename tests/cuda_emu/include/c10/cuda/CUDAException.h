// cuda_emu stand-in for c10/cuda/CUDAException.h: an emulated launch throws its own errors.
#pragma once
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
