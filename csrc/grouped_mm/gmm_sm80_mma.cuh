// sm_80 tensor-core building blocks of the grouped-matmul kernels: the PTX wrappers (cp.async,
// ldmatrix, mma.sync), the tile configurations, the global -> shared copier, the ldmatrix fragment
// addressing, the multi-stage main loop and the epilogue. Used by the mma.sync forward
// (gmm_sm80_mma.cu), the weight gradient (gmm_wgrad.cu) and, for cp.async and the copier, the wgmma
// forward (gmm_sm90_wgmma.cu). Plain CUDA C++, no torch headers.
#pragma once

#include <cstdint>
#include <type_traits>

#include "grouped_mm/gmm_common.cuh"

namespace moestream {
namespace gmm {
namespace detail {

// ----------------------------------------------------------------------------------------------
// sm_80 tensor-core PTX (also valid on sm_90). Callers are compiled only where __CUDA_ARCH__ >= 800.

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; when !valid nothing is read and the 16 bytes are zero-filled.
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// Four 8x8 b16 matrices from shared memory, transposed (.trans) when kTrans.
#define MS_LDMATRIX_X4(SUFFIX)                                                                \
  asm volatile("ldmatrix.sync.aligned.m8n8.x4" SUFFIX ".shared.b16 {%0, %1, %2, %3}, [%4];\n" \
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                               \
               : "r"(addr))
template <bool kTrans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kTrans)
    MS_LDMATRIX_X4(".trans");
  else
    MS_LDMATRIX_X4("");
#endif
}
#undef MS_LDMATRIX_X4

// d += a * b for one m16n8k16 tile, fp32 accumulation; TYPE is the PTX type of a and b.
#define MS_MMA16816(TYPE)                                                                             \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." TYPE "." TYPE                                 \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"               \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                      \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    MS_MMA16816("bf16");
  } else {
    static_assert(std::is_same_v<T, __half>, "mma16816: bfloat16 or float16");
    MS_MMA16816("f16");
  }
#endif
}
#undef MS_MMA16816

// ----------------------------------------------------------------------------------------------
// tensor-core (mma.sync) GEMM tile

template <int BM_, int BN_, int WARPS_M_, int WARPS_N_, int STAGES_, int MIN_BLOCKS_>
struct MmaCfg {
  static constexpr int BM = BM_, BN = BN_, BK = 64;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_, MIN_BLOCKS = MIN_BLOCKS_;
  static constexpr int kThreads = WARPS_M * WARPS_N * 32;
  static constexpr int WM = BM / WARPS_M, WN = BN / WARPS_N;
  static constexpr int MI = WM / 16, NI = WN / 8;
  static constexpr int kABytes = BM * BK * 2, kBBytes = BN * BK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kLdc = BN + 8;  // epilogue staging row in elements: 16 B padding, no bank conflicts
  static constexpr int kSmemBytes =
      STAGES * kStageBytes > BM * kLdc * 2 ? STAGES * kStageBytes : BM * kLdc * 2;
  static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tile must be a multiple of 16x16");
  static_assert(BM % 8 == 0 && BN % 64 == 0 && BM >= 64, "tile sizes");
  static_assert((BM * 8) % kThreads == 0 && (BN * 8) % kThreads == 0, "loader mapping");
};

// 128x128x64, 4 warps (2 x 2, 64x64 per warp: 8 ldmatrix.x4 per 32 mma), 3 stages = 96 KiB:
// two CTAs per SM.
using CfgLarge = MmaCfg<128, 128, 2, 2, 3, 2>;
// 64x128x64, 4 warps (1 x 4, 64x32 per warp), 3 stages = 72 KiB, up to three CTAs per SM: for
// groups of few rows (less padding waste).
using CfgSmall = MmaCfg<64, 128, 1, 4, 3, 2>;

// Shared-memory tiles are arrays of 16-byte chunks, `cpr` chunks per row (cpr = 8 or 16), with the
// chunk index XOR-ed by (row & 7). Eight consecutive rows at the same logical chunk (what one
// ldmatrix phase reads) and eight consecutive chunks of a row (what eight cp.async lanes write)
// then land in eight different 16-byte bank groups: conflict-free both ways.
//
// A stage holds BO x 64 of an operand: reduction-contiguous (RC) as BO rows of 8 chunks (64 k),
// outer-contiguous as 64 rows (k) of BO / 8 chunks.

// Global -> shared copier of one operand. Each thread owns one chunk column (c) and the rows
// row_t + it * kRowsPerIt, so its addresses are one pointer plus constant strides, and the XOR
// swizzle (row & 7) is the same for all its rows (kRowsPerIt is a multiple of 8). Out-of-range
// chunks are zero-filled by cp.async, so partial tiles in M, N and K need no other masking.
// Requirements: ptr, ld and the chunk grid 16-byte aligned; RC also needs k_end - k_begin and
// k_begin multiples of 8, outer-contiguous needs o_end a multiple of 8 (checked by the host).
//
// PANEL (outer-contiguous only, for wgmma's N-major operand): the stage is split into panels of 64
// outer elements, each 64 k-rows of 128 B (chunk ^= k & 7): the canonical 128B-swizzle MN-major
// layout. Otherwise k-rows are BO / 8 chunks long.
template <typename T, bool RC, int BO, int kThreads, bool PANEL = false>
struct Loader {
  static constexpr int kCpr = RC ? 8 : BO / 8;
  static constexpr int kChunks = BO * 8;  // = 64 * BO / 8
  static constexpr int kIters = kChunks / kThreads;
  static constexpr int kRowsPerIt = kThreads / kCpr;
  // shared-memory bytes between consecutive k-rows (PANEL: inside a panel; panels are 64 x 128 B)
  static constexpr int kRowBytes = PANEL ? 128 : kCpr * 16;
  static_assert(kChunks % kThreads == 0 && kThreads % kCpr == 0 && kRowsPerIt % 8 == 0, "loader mapping");
  static_assert(!PANEL || (!RC && BO % 64 == 0), "panels are for outer-contiguous operands");

  const T* base;   // any valid address, passed for zero-filled chunks
  const T* gptr;   // iteration 0's chunk at the current k-tile
  int64_t ld;
  int kpos;        // RC: k of this thread's chunk; outer: k of iteration 0's row (current k-tile)
  uint32_t soff;   // shared-memory byte offset of iteration 0's chunk
  uint32_t valid;  // RC: bit it = row of iteration it inside the operand; outer: chunk column inside

  // k_begin < 2^31 (K and M are bounded by the host), so kpos fits an int.
  __device__ __forceinline__ Loader(const Operand<T>& op, int64_t k_begin, int tid) {
    const int row_t = tid / kCpr, c = tid % kCpr;
    base = op.ptr;
    ld = op.ld;
    if constexpr (PANEL)
      soff = static_cast<uint32_t>((c >> 3) * (64 * 128) + row_t * 128 + (((c & 7) ^ (row_t & 7)) * 16));
    else
      soff = static_cast<uint32_t>((row_t * kCpr + (c ^ (row_t & 7))) * 16);
    valid = 0;
    if constexpr (RC) {
      gptr = op.ptr + (op.o_begin + row_t) * op.ld + k_begin + c * 8;
      kpos = static_cast<int>(k_begin) + c * 8;
#pragma unroll
      for (int it = 0; it < kIters; ++it)
        if (op.o_begin + row_t + it * kRowsPerIt < op.o_end) valid |= 1u << it;
    } else {
      gptr = op.ptr + (k_begin + row_t) * op.ld + op.o_begin + c * 8;
      kpos = static_cast<int>(k_begin) + row_t;
      valid = op.o_begin + c * 8 < op.o_end ? 1u : 0u;
    }
  }

  // Copies the current k-tile into the stage at shared address s, then advances one k-tile.
  __device__ __forceinline__ void load_and_advance(uint32_t s, int k_end) {
#pragma unroll
    for (int it = 0; it < kIters; ++it) {
      bool ok;
      if constexpr (RC)
        ok = ((valid >> it) & 1u) && kpos < k_end;
      else
        ok = valid && kpos + it * kRowsPerIt < k_end;
      detail::cp_async16(s + soff + it * (kRowsPerIt * kRowBytes), ok ? gptr + it * kRowsPerIt * ld : base, ok);
    }
    gptr += RC ? int64_t(64) : 64 * ld;
    kpos += 64;
  }
};

// Per-lane byte offsets of the ldmatrix.x4 row addresses inside a stage, for fragment f (m16 for A,
// pair of n8 for B, at outer index wbase + 16 f) and k-step j (k = 16 j). Lanes 8q..8q+7 give the
// eight rows of matrix q (i = lane & 7). With row & 7 == i for every address of a lane, only the
// XOR-ed chunk varies: across j for RC tiles, across f for outer-contiguous ones; the other index
// is a constant byte offset that folds into the instruction.
//   A (m16 x k16), register order (m 0-7, k 0-7) (m 8-15, k 0-7) (m 0-7, k 8-15) (m 8-15, k 8-15):
//     RC [m][k], plain:      row = (q & 1) * 8 + i,   chunk = 2 j + (q >> 1)
//     outer [k][m], .trans:  krow = (q >> 1) * 8 + i, chunk = wbase / 8 + 2 f + (q & 1)
//   B (two n8 x k16 fragments), order (n 0-7, k 0-7) (n 0-7, k 8-15) (n 8-15, k 0-7) (n 8-15, k 8-15):
//     RC [n][k], plain:      row = (q >> 1) * 8 + i,  chunk = 2 j + (q & 1)
//     outer [k][n], .trans:  krow = (q & 1) * 8 + i,  chunk = wbase / 8 + 2 f + (q >> 1)
// Plain ldmatrix of a [outer][k] tile gives lane l the pair (outer l / 4, k 2(l % 4) ..+1); .trans
// of a [k][outer] tile gives the same pair: exactly mma's A (row-major) and B (column) fragments.
template <bool RC, bool IS_A, int BO, int NF>
struct FragAddr {
  static constexpr int kCpr = RC ? 8 : BO / 8;
  static constexpr int NV = RC ? 4 : NF;  // offsets that differ by more than a constant
  static_assert(kCpr % 8 == 0, "swizzle needs rows of 8 or 16 chunks");
  uint32_t off[NV];

  __device__ __forceinline__ FragAddr(int wbase, int lane) {
    const int q = lane >> 3, i = lane & 7;
    const int sel_row = IS_A ? (RC ? (q & 1) : (q >> 1)) : (RC ? (q >> 1) : (q & 1));
    const int sel_chunk = IS_A ? (RC ? (q >> 1) : (q & 1)) : (RC ? (q & 1) : (q >> 1));
#pragma unroll
    for (int v = 0; v < NV; ++v) {
      if constexpr (RC)
        off[v] = static_cast<uint32_t>(((wbase + sel_row * 8 + i) * 8 + ((2 * v + sel_chunk) ^ i)) * 16);
      else
        off[v] = static_cast<uint32_t>(((sel_row * 8 + i) * kCpr + (((wbase >> 3) + 2 * v + sel_chunk) ^ i)) * 16);
    }
  }
  __device__ __forceinline__ uint32_t operator()(uint32_t stage, int f, int j) const {
    if constexpr (RC)
      return stage + off[j] + f * (16 * 8 * 16);
    else
      return stage + off[f] + j * (16 * kCpr * 16);
  }
};

// Zeroes one thread's accumulators of a Cfg tile.
template <class Cfg>
__device__ __forceinline__ void mma_zero(float (&acc)[Cfg::MI][Cfg::NI][4]) {
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[mi][ni][v] = 0.f;
}

// acc += A[o_a-tile, k_begin:k_end] * B[k_begin:k_end, o_b-tile]. Ends with all cp.async groups
// drained and a barrier, so the caller may reuse the shared memory.
template <typename T, class Cfg, bool A_RC, bool B_RC>
__device__ __forceinline__ void mma_mainloop(float (&acc)[Cfg::MI][Cfg::NI][4], char* smem, const Operand<T>& A,
                                             const Operand<T>& B, int64_t k_begin, int64_t k_end) {
  constexpr int BK = Cfg::BK, STAGES = Cfg::STAGES;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / Cfg::WARPS_N, warp_n = warp % Cfg::WARPS_N;
  const uint32_t s0 = detail::smem_u32(smem);
  const int num_k = static_cast<int>((k_end - k_begin + BK - 1) / BK);
  const int k_end32 = static_cast<int>(k_end);

  Loader<T, A_RC, Cfg::BM, Cfg::kThreads> la(A, k_begin, tid);
  Loader<T, B_RC, Cfg::BN, Cfg::kThreads> lb(B, k_begin, tid);
  const FragAddr<A_RC, true, Cfg::BM, Cfg::MI> fa(warp_m * Cfg::WM, lane);
  const FragAddr<B_RC, false, Cfg::BN, Cfg::NI / 2> fb(warp_n * Cfg::WN, lane);

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < num_k) {
      la.load_and_advance(s0 + s * Cfg::kStageBytes, k_end32);
      lb.load_and_advance(s0 + s * Cfg::kStageBytes + Cfg::kABytes, k_end32);
    }
    detail::cp_async_commit();  // (possibly empty) group, so the wait counts stay uniform
  }

  int read_stage = 0, write_stage = STAGES - 1;
  for (int kt = 0; kt < num_k; ++kt) {
    // groups committed so far: STAGES - 1 + kt; k-tile kt is ready once at most STAGES - 2 are pending
    detail::cp_async_wait<STAGES - 2>();
    __syncthreads();  // k-tile kt visible to all; everyone is done reading k-tile kt - 1's stage
    if (kt + STAGES - 1 < num_k) {
      la.load_and_advance(s0 + write_stage * Cfg::kStageBytes, k_end32);
      lb.load_and_advance(s0 + write_stage * Cfg::kStageBytes + Cfg::kABytes, k_end32);
    }
    detail::cp_async_commit();
    const uint32_t sa = s0 + read_stage * Cfg::kStageBytes;
    const uint32_t sb = sa + Cfg::kABytes;
#pragma unroll
    for (int j = 0; j < BK / 16; ++j) {
      uint32_t af[Cfg::MI][4];
      uint32_t bf[Cfg::NI][2];
#pragma unroll
      for (int mi = 0; mi < Cfg::MI; ++mi) detail::ldmatrix_x4<!A_RC>(af[mi], fa(sa, mi, j));
#pragma unroll
      for (int nj = 0; nj < Cfg::NI / 2; ++nj) {
        uint32_t r[4];
        detail::ldmatrix_x4<!B_RC>(r, fb(sb, nj, j));
        bf[2 * nj][0] = r[0];
        bf[2 * nj][1] = r[1];
        bf[2 * nj + 1][0] = r[2];
        bf[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
        for (int ni = 0; ni < Cfg::NI; ++ni) detail::mma16816<T>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
    }
    read_stage = read_stage == STAGES - 1 ? 0 : read_stage + 1;
    write_stage = write_stage == STAGES - 1 ? 0 : write_stage + 1;
  }
  detail::cp_async_wait<0>();
  __syncthreads();
}

// Writes the accumulator tile (+ bias[col], float32) to out[row0 + r][col0 + c] for rows < row_end
// and columns < col_end, staged through shared memory so global stores are 16 bytes. col_end, ldo
// and col0 must be multiples of 8, out 16-byte aligned. Rows and columns are below 2^30 (host
// checks), so they travel as int: fewer registers live across the main loop.
template <typename T, class Cfg>
__device__ __forceinline__ void mma_epilogue(const float (&acc)[Cfg::MI][Cfg::NI][4], char* smem, T* out,
                                             int64_t ldo, int row0, int row_end, int col0, int col_end,
                                             const float* bias) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp / Cfg::WARPS_N, warp_n = warp % Cfg::WARPS_N;
  T* sc = reinterpret_cast<T*>(smem);
#pragma unroll
  for (int ni = 0; ni < Cfg::NI; ++ni) {
    const int c = warp_n * Cfg::WN + ni * 8 + (lane & 3) * 2;
    float b0 = 0.f, b1 = 0.f;
    if (bias != nullptr && col0 + c < col_end) {
      const float2 bb = __ldg(reinterpret_cast<const float2*>(bias + col0 + c));
      b0 = bb.x;
      b1 = bb.y;
    }
#pragma unroll
    for (int mi = 0; mi < Cfg::MI; ++mi) {
      const int r = warp_m * Cfg::WM + mi * 16 + (lane >> 2);
      *reinterpret_cast<uint32_t*>(sc + r * Cfg::kLdc + c) =
          detail::pack2<T>(acc[mi][ni][0] + b0, acc[mi][ni][1] + b1);
      *reinterpret_cast<uint32_t*>(sc + (r + 8) * Cfg::kLdc + c) =
          detail::pack2<T>(acc[mi][ni][2] + b0, acc[mi][ni][3] + b1);
    }
  }
  __syncthreads();
  constexpr int kCpr = Cfg::BN / 8;
#pragma unroll
  for (int it = 0; it < Cfg::BM * kCpr / Cfg::kThreads; ++it) {
    const int i = it * Cfg::kThreads + tid;
    const int r = i / kCpr, c = i % kCpr;
    const int gr = row0 + r, gc = col0 + c * 8;
    if (gr < row_end && gc < col_end)
      *reinterpret_cast<uint4*>(out + static_cast<int64_t>(gr) * ldo + gc) =
          *reinterpret_cast<const uint4*>(sc + r * Cfg::kLdc + c * 8);
  }
  __syncthreads();
}

}  // namespace detail
}  // namespace gmm
}  // namespace moestream
