// sm_90a warpgroup MMA (wgmma) helpers of the grouped-matmul wgmma forward (gmm_sm90_wgmma.cu):
// shared-memory matrix descriptors, fences, commit/wait, and wgmma.mma_async with both operands in
// shared memory. Everything compiles to nothing unless the target is sm_90a
// (__CUDA_ARCH_FEAT_SM90_ALL); the host only selects the wgmma kernel on compute capability 9.0 when
// its binary was built for sm_90a.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define MS_GMM_HAS_WGMMA 1
#else
#define MS_GMM_HAS_WGMMA 0
#endif

namespace moestream {
namespace gmm {
namespace detail {

// Shared-memory matrix descriptor for the 128-byte swizzle mode: start address, leading and stride
// byte offsets (all in 16-byte units, 14 bits each), layout type 1 (128B swizzle) in bits 62-63.
// The swizzle XORs address bits [4:7) with bits [7:10), so tiles start on 1024-byte boundaries
// and the base-offset field stays 0.
//   K-major (rows of 64 elements = 128 B, chunk ^= row & 7): LBO unused (16), SBO = 1024 (8 rows).
//   MN-major (panels of 64 MN-elements; in a panel k-rows of 128 B, chunk ^= k & 7): LBO = panel
//   stride, SBO = 1024 (8 k-rows).
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) | (uint64_t(1) << 62);
}

__device__ __forceinline__ void wgmma_fence() {
#if MS_GMM_HAS_WGMMA
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if MS_GMM_HAS_WGMMA
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if MS_GMM_HAS_WGMMA
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Makes this thread's generic-proxy shared-memory writes (cp.async included, once complete)
// visible to the async proxy that wgmma reads through.
__device__ __forceinline__ void fence_proxy_async_smem() {
#if MS_GMM_HAS_WGMMA
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// Keeps the compiler from moving reads of the accumulators above a wgmma wait (it does not know
// that wgmma writes them asynchronously).
template <int N>
__device__ __forceinline__ void fence_regs(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// The 128 accumulator registers of an m64n256k16 wgmma: their place in the PTX text and their
// constraints.
#define MS_WGMMA_D128                                                                                \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15,"                           \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31,"                  \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47,"                  \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63,"                  \
  "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79,"                  \
  "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95,"                  \
  "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111,"      \
  "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127},"
#define MS_WGMMA_D128_OUT(d)                                                                                      \
  "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),                 \
  "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),           \
  "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),         \
  "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),         \
  "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),         \
  "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),         \
  "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),         \
  "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]),         \
  "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]),         \
  "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]),         \
  "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]),         \
  "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]),         \
  "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]),     \
  "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), \
  "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), \
  "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])

// D[64 x N] += A[64 x 16] * B[16 x N], A and B described by shared-memory descriptors (N = 256). A is
// K-major; B is K-major (TB = 0) or N-major (TB = 1). Accumulator fragment of warp w of the
// warpgroup, lane (g = lane / 4, t = lane % 4): d[4 j + v] is row 16 w + g + 8 (v / 2), column
// 8 j + 2 t + (v % 2). The immediates after the descriptors: scale-d 1 (accumulate), scale-a 1,
// scale-b 1, A K-major (0), B's major-ness TB.
template <typename T, int N, int TB>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t da, uint64_t db) {
  static_assert(N == 256, "wgmma_ss: only m64n256k16 is wrapped");
#if MS_GMM_HAS_WGMMA
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " MS_WGMMA_D128
                 " %128, %129, 1, 1, 1, 0, %130;\n"
                 : MS_WGMMA_D128_OUT(d)
                 : "l"(da), "l"(db), "n"(TB));
  } else {
    static_assert(std::is_same_v<T, __half>, "wgmma_ss: bfloat16 or float16");
    asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " MS_WGMMA_D128
                 " %128, %129, 1, 1, 1, 0, %130;\n"
                 : MS_WGMMA_D128_OUT(d)
                 : "l"(da), "l"(db), "n"(TB));
  }
#else
  (void)d;
  (void)da;
  (void)db;
#endif
}

#undef MS_WGMMA_D128_OUT
#undef MS_WGMMA_D128

}  // namespace detail
}  // namespace gmm
}  // namespace moestream
