// Explicit 32-byte SIMD vectors for the CPU kernels (GCC/Clang vector extensions).
//
// A kernel body is written once on Vec<T>::type and instantiated twice: inlined into a wrapper
// compiled for AVX2 and into one for the baseline ISA (where each 32-byte op becomes two SSE
// ops); cpu_has_avx2() picks one at run time.  ISO C++ mode (-std=c++20) implies
// -ffp-contract=off, so no product is fused into an FMA and both builds give bit-identical
// results: the lane structure fixes the order of every sum.
#pragma once

// The vectors never cross a call boundary (the kernels are inlined into their ISA wrappers),
// so GCC's note on the ABI of passing 32-byte vectors does not apply (the build passes
// -Wno-psabi: this pragma alone does not silence the note).
#pragma GCC diagnostic ignored "-Wpsabi"

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

#define SOO_ALWAYS_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) || defined(__i386__)
#define SOO_TARGET_AVX2 __attribute__((target("avx2")))
#define SOO_HAVE_AVX2_PATH 1
#else
#define SOO_HAVE_AVX2_PATH 0
#endif

namespace soo::cpu {

template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int width = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int width = 4;
};

// Loads of Vec<acc_t>::width consecutive elements stored as acc_t or as bfloat16 (acc_t = float).
template <typename acc_t>
SOO_ALWAYS_INLINE typename Vec<acc_t>::type load(const acc_t* p) {
  typename Vec<acc_t>::type v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V, typename T>
SOO_ALWAYS_INLINE void store(T* p, V v) { std::memcpy(p, &v, sizeof v); }

SOO_ALWAYS_INLINE Vec<float>::type load_as_float(const c10::BFloat16* p) {
  typedef uint16_t u16x8 __attribute__((vector_size(16)));
  typedef uint32_t u32x8 __attribute__((vector_size(32)));
  u16x8 bits;
  std::memcpy(&bits, p, sizeof bits);
  const u32x8 widened = __builtin_convertvector(bits, u32x8) << 16;  // bf16 is fp32's top half
  Vec<float>::type v;
  std::memcpy(&v, &widened, sizeof v);
  return v;
}

template <typename acc_t>
SOO_ALWAYS_INLINE typename Vec<acc_t>::type load(const c10::BFloat16* p) {
  static_assert(std::is_same_v<acc_t, float>, "bfloat16 storage is accumulated in float");
  return load_as_float(p);
}

template <typename acc_t>
SOO_ALWAYS_INLINE acc_t scalar(acc_t x) { return x; }
SOO_ALWAYS_INLINE float scalar(c10::BFloat16 x) { return static_cast<float>(x); }

// Lane sum in a fixed order (lane 0 first).
template <typename V>
SOO_ALWAYS_INLINE auto lane_sum(V v) {
  auto total = v[0];
  for (int l = 1; l < static_cast<int>(sizeof(V) / sizeof(v[0])); ++l) total += v[l];
  return total;
}

template <typename V>
SOO_ALWAYS_INLINE auto lane_max(V v) {
  auto best = v[0];
  for (int l = 1; l < static_cast<int>(sizeof(V) / sizeof(v[0])); ++l)
    best = v[l] > best ? v[l] : best;
  return best;
}

// SOO_EXT_CPU_BASELINE=1 forces the baseline build (tests compare the two).
inline bool cpu_has_avx2() {
#if SOO_HAVE_AVX2_PATH
  static const bool has = __builtin_cpu_supports("avx2") && !std::getenv("SOO_EXT_CPU_BASELINE");
  return has;
#else
  return false;
#endif
}

}  // namespace soo::cpu
