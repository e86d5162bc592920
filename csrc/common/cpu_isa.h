// CPU instruction sets: run-time detection and the target attributes of the vectorised CPU code.
//
// The extension is compiled for the baseline x86-64 ISA. Hot loops have AVX2 (+ FMA + F16C) or
// AVX-512 versions written with intrinsics inside functions marked with the target attributes
// below, chosen at run time with the has_*() tests, so that no code built for a wider ISA can
// leak into the baseline paths. Elsewhere (other architectures, other compilers) the macros are
// empty, MS_HAVE_X86_SIMD is 0 and the portable versions run.
#pragma once

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define MS_HAVE_X86_SIMD 1
#define MS_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MS_TARGET_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#else
#define MS_HAVE_X86_SIMD 0
#define MS_TARGET_AVX2
#define MS_TARGET_AVX512BF16
#endif

// A function compiled twice, for AVX2 and for the baseline, the copy picked at load time
// (function multiversioning through ifunc: 64-bit Linux only). No FMA in the AVX2 copy, so both
// round identically.
#if MS_HAVE_X86_SIMD && defined(__x86_64__) && defined(__linux__)
#define MS_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MS_AVX2_CLONES
#endif

namespace moestream {
namespace cpu {

// AVX2, FMA and F16C: everything MS_TARGET_AVX2 code uses.
inline bool has_avx2() {
#if MS_HAVE_X86_SIMD
  static const bool ok =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return ok;
#else
  return false;
#endif
}

// AVX-512 F/BW/VL/DQ + BF16 (VDPBF16PS): everything MS_TARGET_AVX512BF16 code uses.
inline bool has_avx512_bf16() {
#if MS_HAVE_X86_SIMD
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

// AVX-512 BW/VL/DQ: what ATen requires before it routes bfloat16 GEMMs to oneDNN.
inline bool has_avx512_bw_vl_dq() {
#if MS_HAVE_X86_SIMD
  static const bool ok = __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                         __builtin_cpu_supports("avx512dq");
  return ok;
#else
  return false;
#endif
}

// AVX-512-FP16: what ATen requires before it routes float16 GEMMs to oneDNN.
inline bool has_avx512_fp16() {
#if MS_HAVE_X86_SIMD
  static const bool ok = __builtin_cpu_supports("avx512fp16");
  return ok;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace moestream
