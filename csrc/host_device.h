// SOO_HOST_DEVICE: scalar code shared by a CPU kernel and a CUDA kernel is compiled for both.
#pragma once

#if defined(__CUDACC__)
#define SOO_HOST_DEVICE __host__ __device__
#else
#define SOO_HOST_DEVICE
#endif
