// A CPU emulation of the CUDA execution model, just wide enough to run soo_ext's own CUDA
// kernels (csrc/cuda/*.cu, rewritten by tests/cuda_emu/__init__.py) on CPU tensors, so that their
// indexing, reductions, barriers, warp shuffles and launch configurations are tested where no GPU
// is.  Force-included (-include) before each rewritten source.  It proves nothing about the
// hardware (memory model, timing, cuBLAS/cuSOLVER through ATen, which run on the CPU here).
//
// A launch runs the blocks one after another, and the threads of a block as fibers on one OS
// thread that switch at __syncthreads and warp shuffles.  A block runs warp by warp, each warp
// until all its lanes wait at __syncthreads (its shuffles are released as soon as its 32 lanes
// arrive): warps are ordered only by __syncthreads, as on the device.  With a seed, blocks, warps
// and lanes run in shuffled orders, so a kernel that depends on block order or lacks a barrier
// fails.  Reported as errors (a RuntimeError in Python): threads at different __syncthreads
// (by call site), or some skipping it; lanes at different shuffles, or a shuffle in a partial
// warp; a deadlock; a misaligned vector load or store; an invalid launch configuration (also
// against the kernel's __launch_bounds__); more than 48 KB of shared memory; a write outside a
// shared-memory region.  Shared memory (static and dynamic) is one instance for the threads of
// the block that runs, filled with NaN bytes (0xFF) at the start of every block, between
// poisoned red zones.  Fiber stacks have guard pages.
// Single-threaded: launches from two threads at once are not supported.
#pragma once

// The fibers switch stacks with _setjmp/_longjmp, which glibc's fortified longjmp refuses.
#undef _FORTIFY_SOURCE

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <setjmp.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <source_location>
#include <stdexcept>
#include <string>
#include <memory>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

// ---- CUDA vector types and dim3 ------------------------------------------------------------ //
struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) double2 { double x, y; };
struct alignas(8) uint2 { unsigned x, y; };
struct alignas(16) uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

struct cudaDeviceProp {
  int multiProcessorCount = 2;
  int maxThreadsPerBlock = 1024;
  size_t sharedMemPerBlock = 48 * 1024;
  int warpSize = 32;
  int major = 9, minor = 0;
};

namespace soo_emu {

enum class Wait { kRun, kBlock, kWarp, kDone };

struct Fiber {
  jmp_buf env;
  ucontext_t uc;
  uint3 tid;
  int linear = 0;
  Wait wait = Wait::kRun;
  int pred = 1;
  bool started = false;
  std::source_location site;  // of the barrier or shuffle it waits at
};

struct State {
  cudaDeviceProp prop;
  // 0: blocks, warps and lanes in order; else permutations drawn from the seed
  uint64_t order_seed = 0;
  uint64_t launches = 0;  // since the last configure (the permutations depend on it)
  // the launch that runs
  dim3 grid, block;
  uint3 block_idx{0, 0, 0};
  std::vector<Fiber> fibers;
  unsigned char* stacks = nullptr;  // mmap'ed: per fiber a guard page, then its stack
  size_t stacks_bytes = 0;
  Fiber* cur = nullptr;
  std::function<void()> body;
  // shared memory: the dynamic part, and the __shared__ variables by declaration; each sits
  // between red zones that must still hold the poison when the block ends
  std::vector<unsigned char> dyn_smem;
  size_t dyn_bytes = 0;
  uint64_t block_serial = 0;  // counts the blocks run: shared memory is fresh in each
  size_t static_bytes = 0;    // the __shared__ variables of the block that runs
  struct Shared {
    uint64_t block = 0;
    std::vector<unsigned char> bytes;
    size_t offset = 0, size = 0;  // where the variable sits in bytes
  };
  std::unordered_map<const void*, Shared> shared;
  std::vector<uint64_t> lanes;  // one slot per thread for the shuffles
  int and_result = 1;
  std::string error;
  jmp_buf sched;
  ucontext_t sched_uc;
};

inline State& state() {
  static State s;
  return s;
}

constexpr size_t kStack = 64 * 1024;
constexpr size_t kPage = 4096;
// Shared memory starts every block filled with this byte: floats and doubles read NaN, so a
// kernel that reads shared memory before writing it in the same block poisons its result.
constexpr unsigned char kPoison = 0xFF;
constexpr size_t kRedZone = 256;  // poisoned bytes before and after each shared region

inline std::string where(const std::source_location& l) {
  return std::string(l.file_name()) + ":" + std::to_string(l.line());
}

[[noreturn]] inline void leave_fiber(Wait how) {
  State& s = state();
  s.cur->wait = how;
  _longjmp(s.sched, 1);
}

inline void yield_at(Wait how, const std::source_location& site) {
  State& s = state();
  Fiber* f = s.cur;
  f->wait = how;
  f->site = site;
  if (!_setjmp(f->env)) _longjmp(s.sched, 1);
}

// An error inside a kernel: recorded (the first one), the thread ends, the launch fails.
[[noreturn]] inline void fail(const std::string& what) {
  State& s = state();
  if (!s.cur) throw std::runtime_error("cuda_emu: " + what + " (in host code)");
  if (s.error.empty())
    s.error = what + " (block " + std::to_string(s.block_idx.x) + ", thread " +
              std::to_string(s.cur->linear) + ")";
  leave_fiber(Wait::kDone);
}

inline void trampoline() {
  State& s = state();
  try {
    s.body();
  } catch (const std::exception& e) {  // unwound on the fiber's own stack
    if (s.error.empty()) s.error = std::string("exception in a kernel: ") + e.what();
  }
  leave_fiber(Wait::kDone);
}

inline void allocate_stacks(int nt) {
  State& s = state();
  const size_t need = static_cast<size_t>(nt) * (kPage + kStack);
  if (s.stacks_bytes >= need) return;
  if (s.stacks) munmap(s.stacks, s.stacks_bytes);
  void* p = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cuda_emu: cannot map the fiber stacks");
  s.stacks = static_cast<unsigned char*>(p);
  s.stacks_bytes = need;
  // a stack grows down: an overflow hits the guard page below it (a crash, not corruption)
  for (int t = 0; t < nt; ++t) mprotect(s.stacks + t * (kPage + kStack), kPage, PROT_NONE);
}

inline void switch_to(Fiber& f) {
  State& s = state();
  s.cur = &f;
  if (!_setjmp(s.sched)) {
    if (!f.started) {
      f.started = true;
      swapcontext(&s.sched_uc, &f.uc);
    } else {
      _longjmp(f.env, 1);
    }
  }
  s.cur = nullptr;
}

inline bool red_zone_intact(const unsigned char* p) {
  for (size_t i = 0; i < kRedZone; ++i)
    if (p[i] != kPoison) return false;
  return true;
}

// Runs s.body for every thread of the current block.  Warps run one at a time (in a shuffled
// order with a seed), each until all its lanes wait at __syncthreads or have left: a warp gets
// through its shuffles without the others, as on the device, so a missing __syncthreads between
// one warp's shared-memory writes and another's reads shows.
inline void run_block(std::mt19937_64* rng) {
  State& s = state();
  const int nt = static_cast<int>(s.block.x * s.block.y * s.block.z);
  ++s.block_serial;
  s.static_bytes = 0;
  std::fill(s.dyn_smem.begin(), s.dyn_smem.end(), kPoison);
  allocate_stacks(nt);
  s.fibers.assign(nt, Fiber{});
  for (int t = 0; t < nt; ++t) {
    Fiber& f = s.fibers[t];
    f.linear = t;
    f.tid = {static_cast<unsigned>(t % s.block.x),
             static_cast<unsigned>((t / s.block.x) % s.block.y),
             static_cast<unsigned>(t / (s.block.x * s.block.y))};
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = s.stacks + t * (kPage + kStack) + kPage;
    f.uc.uc_stack.ss_size = kStack;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, trampoline, 0);
  }
  s.lanes.assign(nt, 0);
  const int warps = (nt + 31) / 32;
  std::vector<int> warp_order(warps), lane_order(32);
  std::iota(warp_order.begin(), warp_order.end(), 0);
  std::iota(lane_order.begin(), lane_order.end(), 0);
  if (rng) {
    std::shuffle(warp_order.begin(), warp_order.end(), *rng);
    std::shuffle(lane_order.begin(), lane_order.end(), *rng);
  }
  for (;;) {
    for (int w : warp_order) {
      const int lo = w * 32, hi = std::min(nt, lo + 32);
      for (;;) {  // this warp, until its lanes are all at __syncthreads or gone
        bool ran = false;
        for (int l : lane_order) {
          if (lo + l >= hi || s.fibers[lo + l].wait != Wait::kRun) continue;
          switch_to(s.fibers[lo + l]);
          ran = true;
          if (!s.error.empty()) return;
        }
        int waiting = 0, gone = 0;
        for (int t = lo; t < hi; ++t) {
          waiting += s.fibers[t].wait == Wait::kWarp;
          gone += s.fibers[t].wait == Wait::kDone;
        }
        if (waiting == 0) {
          if (!ran) break;
          continue;
        }
        if (hi - lo != 32) {
          s.error = "warp shuffle in a partial warp (block size not a multiple of 32)";
          return;
        }
        if (waiting < 32) {
          if (gone > 0) {
            s.error = "warp shuffle with lanes that have left the kernel";
            return;
          }
          break;  // other lanes wait at __syncthreads: a deadlock, reported below
        }
        for (int t = lo; t < hi; ++t) {
          if (s.fibers[t].site.line() != s.fibers[lo].site.line() ||
              std::strcmp(s.fibers[t].site.file_name(), s.fibers[lo].site.file_name()) != 0) {
            s.error = "lanes of a warp at different shuffles (" + where(s.fibers[lo].site) +
                      ", " + where(s.fibers[t].site) + ")";
            return;
          }
        }
        for (int t = lo; t < hi; ++t) s.fibers[t].wait = Wait::kRun;
      }
    }
    int done = 0, at_block = 0, at_warp = 0;
    for (const Fiber& f : s.fibers) {
      done += f.wait == Wait::kDone;
      at_block += f.wait == Wait::kBlock;
      at_warp += f.wait == Wait::kWarp;
    }
    if (done == nt) break;
    if (at_block == 0 || at_block + done != nt) {
      s.error = "deadlock: " + std::to_string(at_block) + " threads at __syncthreads, " +
                std::to_string(at_warp) + " at a shuffle, " + std::to_string(done) + " done";
      return;
    }
    if (done > 0) {
      s.error = "__syncthreads reached by some threads while others have left the kernel";
      return;
    }
    const Fiber& first = s.fibers[0];
    int all = 1;
    for (const Fiber& f : s.fibers) {
      if (f.site.line() != first.site.line() ||
          std::strcmp(f.site.file_name(), first.site.file_name()) != 0) {
        s.error = "threads at different __syncthreads (" + where(first.site) + ", " +
                  where(f.site) + ")";
        return;
      }
      all &= f.pred != 0;
    }
    s.and_result = all;
    for (Fiber& f : s.fibers) f.wait = Wait::kRun;
  }
  // out-of-bounds writes to shared memory: the red zones
  if (s.dyn_bytes &&
      !(red_zone_intact(s.dyn_smem.data()) &&
        red_zone_intact(s.dyn_smem.data() + kRedZone + s.dyn_bytes)))
    s.error = "write outside the dynamic shared memory";
  for (const auto& [key, v] : s.shared)
    if (v.block == s.block_serial &&
        !(red_zone_intact(v.bytes.data() + v.offset - kRedZone) &&
          red_zone_intact(v.bytes.data() + v.offset + v.size)))
      s.error = "write outside a __shared__ variable";
}

// kernel<<<grid, block, smem, stream>>>(args...) is rewritten to
// ::soo_emu::Launch(grid, block, smem, stream)(kernel, args...).
struct Launch {
  dim3 grid, block;
  size_t smem;
  template <typename Stream = int>
  Launch(dim3 g, dim3 b, size_t sm = 0, Stream = {}) : grid(g), block(b), smem(sm) {}

  template <typename... P, typename... A>
  void operator()(void (*kernel)(P...), A&&... args) const {
    State& s = state();
    const uint64_t nt = uint64_t(block.x) * block.y * block.z;
    auto bad = [&](const std::string& why) {
      throw std::runtime_error("cuda_emu: invalid launch: " + why);
    };
    if (nt == 0 || nt > static_cast<uint64_t>(s.prop.maxThreadsPerBlock) || block.z > 64)
      bad("block of " + std::to_string(nt) + " threads");
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 ||
        grid.z > 65535)
      bad("grid " + std::to_string(grid.x) + " x " + std::to_string(grid.y) + " x " +
          std::to_string(grid.z));
    if (smem > s.prop.sharedMemPerBlock)
      bad(std::to_string(smem) + " bytes of dynamic shared memory");
    ++s.launches;
    // every thread gets its own copy of the parameters, converted as the kernel declares them
    std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    s.grid = grid;
    s.block = block;
    s.dyn_bytes = smem;
    s.dyn_smem.assign(smem ? smem + 2 * kRedZone : 0, kPoison);
    s.error.clear();
    s.body = [&]() {
      auto mine = params;
      std::apply(kernel, mine);
    };
    const uint64_t nb = uint64_t(grid.x) * grid.y * grid.z;
    std::vector<uint64_t> order(nb);
    std::iota(order.begin(), order.end(), 0);
    std::mt19937_64 rng(s.order_seed * 1000003 + s.launches);
    if (s.order_seed) std::shuffle(order.begin(), order.end(), rng);
    for (uint64_t b : order) {
      s.block_idx = {static_cast<unsigned>(b % grid.x),
                     static_cast<unsigned>((b / grid.x) % grid.y),
                     static_cast<unsigned>(b / (uint64_t(grid.x) * grid.y))};
      run_block(s.order_seed ? &rng : nullptr);
      if (!s.error.empty()) {
        std::string e = s.error;
        s.error.clear();
        s.body = nullptr;
        throw std::runtime_error("cuda_emu: " + e);
      }
    }
    s.body = nullptr;
  }
};

inline unsigned char* dynamic_smem() { return state().dyn_smem.data() + kRedZone; }

// A __shared__ variable of type T (__init__.py rewrites each declaration to this, keyed by a
// function-local static): one instance for the threads of the block that runs, poisoned at the
// start of every block, between red zones; the block's static shared memory plus the dynamic
// part must fit the device's 48 KB.
template <typename T>
inline T& shared(const void* key) {
  static_assert(std::is_trivially_copyable_v<std::remove_all_extents_t<T>>);
  static_assert(alignof(T) <= kRedZone);
  State& s = state();
  State::Shared& v = s.shared[key];
  if (v.block != s.block_serial) {
    v.block = s.block_serial;
    v.offset = kRedZone;
    v.size = sizeof(T);
    v.bytes.assign(2 * kRedZone + sizeof(T), kPoison);
    s.static_bytes += sizeof(T);
    if (s.static_bytes + s.dyn_bytes > s.prop.sharedMemPerBlock)
      fail(std::to_string(s.static_bytes + s.dyn_bytes) + " bytes of shared memory");
  }
  // vector<unsigned char> storage is aligned for any fundamental type; kRedZone keeps it so
  return *reinterpret_cast<T*>(v.bytes.data() + v.offset);
}

inline const uint3& thread_idx() { return state().cur->tid; }
inline const uint3& block_idx() { return state().block_idx; }
inline const dim3& block_dim() { return state().block; }
inline const dim3& grid_dim() { return state().grid; }

// reinterpret_cast to a CUDA vector pointer, rewritten to this: the device faults on a
// misaligned vector access, so the emulation does too.
template <typename P, typename Q>
inline P vec_cast(Q* p) {
  using V = std::remove_cv_t<std::remove_pointer_t<P>>;
  if (reinterpret_cast<std::uintptr_t>(p) % alignof(V) != 0)
    fail("misaligned " + std::to_string(alignof(V)) + "-byte vector access");
  return reinterpret_cast<P>(p);
}

// __launch_bounds__(max_threads), rewritten to this at the start of the kernel's body
inline void check_launch_bounds(unsigned max_threads) {
  const dim3& b = state().block;
  if (b.x * b.y * b.z > max_threads)
    fail("block of " + std::to_string(b.x * b.y * b.z) + " threads for __launch_bounds__(" +
         std::to_string(max_threads) + ")");
}

}  // namespace soo_emu

// ---- built-in variables and functions -------------------------------------------------------- //
#define threadIdx (::soo_emu::thread_idx())
#define blockIdx (::soo_emu::block_idx())
#define blockDim (::soo_emu::block_dim())
#define gridDim (::soo_emu::grid_dim())
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

// the call site makes the barrier: threads waiting at different ones are an error
inline void __syncthreads(std::source_location site = std::source_location::current()) {
  ::soo_emu::state().cur->pred = 1;
  ::soo_emu::yield_at(::soo_emu::Wait::kBlock, site);
}
inline int __syncthreads_and(int pred,
                             std::source_location site = std::source_location::current()) {
  ::soo_emu::state().cur->pred = pred;
  ::soo_emu::yield_at(::soo_emu::Wait::kBlock, site);
  return ::soo_emu::state().and_result;
}
inline void __threadfence() {}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32,
                          std::source_location site = std::source_location::current()) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  auto& s = ::soo_emu::state();
  if (mask != 0xffffffffu || width != 32) ::soo_emu::fail("shuffle with a partial mask or width");
  const int me = s.cur->linear, lane = me % 32;
  std::memcpy(&s.lanes[me], &v, sizeof(T));
  ::soo_emu::yield_at(::soo_emu::Wait::kWarp, site);  // every lane has posted its value
  T out = v;
  if (lane + static_cast<int>(delta) < 32) std::memcpy(&out, &s.lanes[me + delta], sizeof(T));
  ::soo_emu::yield_at(::soo_emu::Wait::kWarp, site);  // every lane has read before any posts
  return out;
}

inline unsigned atomicAdd(unsigned* p, unsigned v) {  // one OS thread: plain read-modify-write
  const unsigned old = *p;
  *p = old + v;
  return old;
}
template <typename T>
inline T __ldcg(const T* p) { return *p; }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
// the _rn intrinsics: one rounding each, never contracted into an FMA (here nothing is: the
// emulation is built with -ffp-contract=off, while nvcc contracts a * b + c by default)
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __dadd_rn(double a, double b) { return a + b; }

using std::fabs;
using std::isfinite;
using std::isnan;
using std::pow;
using std::sqrt;
using std::max;
using std::min;
