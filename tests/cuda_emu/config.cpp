// Settings of the emulated device and self-tests of the emulation, as ops callable from Python
// (torch.ops.soo_emu_config.*).  Launches and shared memory are
// written as __init__.py rewrites them.
#include "cuda_emu.h"

namespace {

// The emulated device's SM count (it sizes the grids) and the order of blocks, warps and lanes
// (0: in order, else permutations drawn from the seed); returns the number of launches since
// the last call.
int64_t configure(int64_t sms, int64_t order_seed) {
  TORCH_CHECK(sms >= 1, "configure: sms must be >= 1");
  auto& s = ::soo_emu::state();
  s.prop.multiProcessorCount = static_cast<int>(sms);
  s.order_seed = static_cast<uint64_t>(order_seed);
  const auto launches = static_cast<int64_t>(s.launches);
  s.launches = 0;  // the permutations of a test do not depend on the tests before it
  return launches;
}

// Block sums of threadIdx.x by warp shuffles and shared memory; out[blockIdx.x] = the sum, and
// order[ticket] = blockIdx.x in the order the blocks ran.
__global__ void block_sum_kernel(int64_t* out, int64_t* order, unsigned* ticket) {
  static char key;
  auto& warp_sums = ::soo_emu::shared<int64_t[32]>(&key);
  int64_t v = threadIdx.x;
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (unsigned w = 0; w < blockDim.x / 32; ++w) total += warp_sums[w];
    out[blockIdx.x] = total;
    order[atomicAdd(ticket, 1u)] = blockIdx.x;
  }
}

// out[blockIdx.x] = a shared value that block 0 writes and no block writes after that: fresh
// (NaN) in every block but the first.
__global__ void stale_shared_kernel(float* out) {
  static char key;
  auto& value = ::soo_emu::shared<float>(&key);
  if (blockIdx.x == 0 && threadIdx.x == 0) value = 1;
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = value;
}

// out[0] = what warp 0 reads of a value warp 1 writes, with no __syncthreads between (a race:
// 0 or 1 depending on which warp runs first; the shuffles do not order the warps).
__global__ void warp_race_kernel(float* out) {
  static char key;
  auto& value = ::soo_emu::shared<float>(&key);
  if (threadIdx.x == 0) value = 0;
  __syncthreads();
  float v = __shfl_down_sync(0xffffffffu, float(threadIdx.x), 1);
  if (threadIdx.x == 32) value = 1;
  v = __shfl_down_sync(0xffffffffu, v, 1);
  if (threadIdx.x == 0) out[0] = value;
}

__global__ void different_barriers_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void shared_overflow_kernel(float* out) {
  static char key;
  auto& buf = ::soo_emu::shared<float[32]>(&key);
  buf[threadIdx.x] = 1;  // launched with 64 threads
  __syncthreads();
  out[threadIdx.x] = buf[threadIdx.x % 32];
}

__global__ void bounded_kernel(float* out) {  // as rewritten from __launch_bounds__(32)
  ::soo_emu::check_launch_bounds(32);
  out[threadIdx.x] = 1;
}

__global__ void misaligned_kernel(const float* p, float* out) {
  const float4 v = *::soo_emu::vec_cast<const float4*>(p + 1);
  out[0] = v.x;
}

__global__ void early_exit_kernel(float* out) {
  if (threadIdx.x < 32) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void shuffle_kernel(float* out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, float(threadIdx.x), 1);
}

__global__ void uneven_barrier_kernel(float* out) {  // lane 0 never reaches the shuffle
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_down_sync(0xffffffffu, float(threadIdx.x), 1);
  }
}

// Runs one self-test: "block_sum" (4 blocks of 256: returns blocks and order, see the kernel),
// "stale_shared" (returns the value each of 3 blocks reads), "warp_race" (returns what warp 0
// read; see the kernels); the others must raise: "misaligned", "early_exit", "partial_warp",
// "uneven_barrier", "different_barriers", "shared_overflow", "launch_bounds", "big_block".
std::vector<at::Tensor> selftest(const std::string& which) {
  auto out = at::zeros({1024}, at::kFloat);
  if (which == "block_sum") {
    auto sums = at::zeros({4}, at::kLong), order = at::zeros({4}, at::kLong);
    auto ticket = at::zeros({1}, at::kInt);
    ::soo_emu::Launch(4, 256)(block_sum_kernel, sums.data_ptr<int64_t>(),
                              order.data_ptr<int64_t>(),
                              reinterpret_cast<unsigned*>(ticket.data_ptr<int>()));
    return {sums, order};
  }
  if (which == "stale_shared") {
    ::soo_emu::Launch(3, 32)(stale_shared_kernel, out.data_ptr<float>());
    return {out.narrow(0, 0, 3)};
  }
  if (which == "warp_race") {
    ::soo_emu::Launch(1, 64)(warp_race_kernel, out.data_ptr<float>());
    return {out.narrow(0, 0, 1)};
  }
  if (which == "misaligned") {
    ::soo_emu::Launch(1, 32)(misaligned_kernel, out.data_ptr<float>(), out.data_ptr<float>());
  } else if (which == "early_exit") {
    ::soo_emu::Launch(1, 64)(early_exit_kernel, out.data_ptr<float>());
  } else if (which == "partial_warp") {
    ::soo_emu::Launch(1, 48)(shuffle_kernel, out.data_ptr<float>());
  } else if (which == "uneven_barrier") {
    ::soo_emu::Launch(1, 32)(uneven_barrier_kernel, out.data_ptr<float>());
  } else if (which == "different_barriers") {
    ::soo_emu::Launch(1, 64)(different_barriers_kernel, out.data_ptr<float>());
  } else if (which == "shared_overflow") {
    ::soo_emu::Launch(1, 64)(shared_overflow_kernel, out.data_ptr<float>());
  } else if (which == "launch_bounds") {
    ::soo_emu::Launch(1, 64)(bounded_kernel, out.data_ptr<float>());
  } else if (which == "big_block") {
    ::soo_emu::Launch(1, 2048)(shuffle_kernel, out.data_ptr<float>());
  } else {
    TORCH_CHECK(false, "selftest: unknown case ", which);
  }
  return {out};
}

}  // namespace

TORCH_LIBRARY(soo_emu_config, m) {
  m.def("configure(int sms, int order_seed) -> int", &configure);
  m.def("selftest(str which) -> Tensor[]", &selftest);
}
