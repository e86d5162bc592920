// Grouped matmul CUDA kernels: forward (grouped_mm), weight gradient and bias gradient.
//
// Kernel families (see grouped_mm_cuda.h for the host interface):
//   * schedule  : one 1024-thread CTA turns offsets (device memory) into per-group row bounds and
//                 M-tile prefix sums, so the forward kernels can map a linear tile id to
//                 (group, m-tile, n-tile) without the host ever reading offsets (no sync).
//   * mma       : bf16/fp16 tensor-core GEMM, sm_80 instructions (cp.async multi-stage pipeline,
//                 ldmatrix from XOR-swizzled shared memory, mma.sync.m16n8k16, fp32 accumulation),
//                 persistent CTAs walking the tile list; 16-byte stores through shared memory.
//                 Needs K, N and the leading dimensions to be multiples of 8 elements and 16-byte
//                 aligned pointers.
//   * wgmma     : forward only, sm_90a: 128x256x64 tiles, two warpgroups issuing asynchronous
//                 wgmma.mma_async from 128B-swizzled shared memory fed by cp.async. Chosen only when
//                 the tuning key gmm_impl="wgmma" (auto keeps mma.sync until the wgmma kernel has been
//                 validated on hardware; see forward_impl).
//   * simt      : shared-memory tiled FMA GEMM with register blocking for every dtype and shape.
//                 float32 is true float32 (FFMA, no TF32); float64 accumulates in float64.
//   * gemv      : decode path for groups of a few rows: each CTA streams a slice of one expert's
//                 weights with 16-byte loads and multiplies the group's rows (up to R at a time), so
//                 the time is the weight read.
//   * weight / bias gradients: one CTA per output tile (or column block) reducing the group's rows
//                 in order, deterministic; tensor cores for bf16/fp16 when aligned.
#include "grouped_mm/grouped_mm_cuda.h"

#include <atomic>
#include <climits>
#include <cstdlib>
#include <type_traits>

#include "grouped_mm/gmm_common.cuh"
#include "grouped_mm/gmm_wgmma.cuh"

namespace moestream {
namespace gmm {
namespace {

using detail::TileCoord;

// ================================================================================================
// schedule

constexpr int kScheduleThreads = 1024;

__global__ void __launch_bounds__(kScheduleThreads)
    schedule_kernel(const void* __restrict__ offsets, bool i64, int E, int M, int bm, int* __restrict__ row_bounds,
                    int* __restrict__ mtile_start) {
  __shared__ int s_warp[32];
  __shared__ int s_end[kScheduleThreads];
  __shared__ int s_carry;
  const int tid = threadIdx.x;
  if (tid == 0) {
    row_bounds[0] = 0;
    mtile_start[0] = 0;
  }
  int carry_end = 0, carry_tiles = 0;
  // groups 0 .. E, group E being the tail [offsets[-1], M)
  for (int base = 0; base <= E; base += kScheduleThreads) {
    const int g = base + tid;
    int v = M;  // the tail's end, and padding past it
    if (g < E) {
      int64_t o = detail::load_offset(offsets, i64, g);
      o = o < 0 ? 0 : (o > M ? static_cast<int64_t>(M) : o);
      v = static_cast<int>(o);
    }
    int end = detail::block_inclusive_scan_1024(v, detail::OpMax(), s_warp);
    end = max(end, carry_end);
    s_end[tid] = end;
    __syncthreads();
    const int start = tid == 0 ? carry_end : s_end[tid - 1];
    const int count = g <= E ? (end - start + bm - 1) / bm : 0;
    const int incl = detail::block_inclusive_scan_1024(count, detail::OpAdd(), s_warp) + carry_tiles;
    if (g <= E) {
      row_bounds[g + 1] = end;
      mtile_start[g + 1] = incl;
    }
    if (tid == kScheduleThreads - 1) s_carry = incl;
    __syncthreads();
    carry_end = s_end[kScheduleThreads - 1];
    carry_tiles = s_carry;
    __syncthreads();
  }
}

// ================================================================================================
// operands
//
// A tile operand: element (o, k) of the "outer" dimension o (rows of the output tile for A, columns
// for B) and the reduction dimension k. Reduction-contiguous (RC): ptr[o * ld + k]; outer-contiguous:
// ptr[k * ld + o]. The forward's A is RC; its B is RC when transpose_b ([E, N, K]) and
// outer-contiguous otherwise ([E, K, N]). Both operands of the weight gradient are
// outer-contiguous (the reduction runs over rows of a and dy).
template <typename T>
struct Operand {
  const T* ptr;
  int64_t ld;
  int64_t o_begin;  // tile origin along o
  int64_t o_end;    // bound along o (exclusive)
};

// ================================================================================================
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
      for (int mi = 0; mi < Cfg::MI; ++mi) {
        if constexpr (A_RC)
          detail::ldmatrix_x4(af[mi], fa(sa, mi, j));
        else
          detail::ldmatrix_x4_trans(af[mi], fa(sa, mi, j));
      }
#pragma unroll
      for (int nj = 0; nj < Cfg::NI / 2; ++nj) {
        uint32_t r[4];
        if constexpr (B_RC)
          detail::ldmatrix_x4(r, fb(sb, nj, j));
        else
          detail::ldmatrix_x4_trans(r, fb(sb, nj, j));
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

template <typename T>
struct FwdParams {
  const T* a;
  int64_t lda;
  const T* b;
  const acc_t<T>* bias;
  T* out;
  int64_t ldo;
  int64_t N, K;
  int E;
  const int* row_bounds;
  const int* mtile_start;
};

constexpr int kBand = 8;  // M-tiles per raster band (see detail::decode_tile)

template <typename T, class Cfg, bool B_RC>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::MIN_BLOCKS) mma_forward_kernel(FwdParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) char smem[];
  const int n_tiles = static_cast<int>((p.N + Cfg::BN - 1) / Cfg::BN);
  const int total = __ldg(p.mtile_start + p.E + 1) * n_tiles;
  for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const TileCoord t = detail::decode_tile(tile, n_tiles, p.E, Cfg::BM, kBand, p.row_bounds, p.mtile_start);
    const bool real = t.g < p.E;  // else: tail rows, written as zeros
    const int n0 = t.n_tile * Cfg::BN;
    const T* bg = real ? p.b + static_cast<int64_t>(t.g) * p.K * p.N : p.b;
    const Operand<T> A{p.a, p.lda, t.row_begin, t.row_end};
    const Operand<T> B{bg, B_RC ? p.K : p.N, n0, p.N};
    float acc[Cfg::MI][Cfg::NI][4];
#pragma unroll
    for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
        for (int v = 0; v < 4; ++v) acc[mi][ni][v] = 0.f;
    mma_mainloop<T, Cfg, true, B_RC>(acc, smem, A, B, 0, real ? p.K : 0);
    const float* bias = (real && p.bias != nullptr) ? p.bias + static_cast<int64_t>(t.g) * p.N : nullptr;
    mma_epilogue<T, Cfg>(acc, smem, p.out, p.ldo, t.row_begin, t.row_end, n0, static_cast<int>(p.N), bias);
  }
#endif
}

// ================================================================================================
// sm_90a warpgroup-MMA (wgmma) forward
//
// 128 x 256 x 64 tiles, two warpgroups (rows 0-63 and 64-127 of the tile), four cp.async stages
// (48 KiB each), one CTA per SM, persistent over the same tile list. Both operands are read by
// wgmma straight from shared memory through descriptors: A (rows of a) and, with transpose_b, B
// ([N, K]) are K-major, stored exactly as the mma.sync kernel's RC stages (the canonical 128B
// swizzle); B of [E, K, N] is N-major, stored in panels of 64 columns. Per k-tile: wait for its
// copies, fence them to the async proxy, barrier, issue the four k16 wgmmas, then issue the copies
// of k-tile + 3 into the stage the previous k-tile used (every warpgroup has waited for its wgmmas
// on it before the barrier) while the wgmmas run, then wait for them. No mbarriers or TMA: nothing
// can deadlock on a malformed shape.
struct WgmmaCfg {
  static constexpr int BM = 128, BN = 256, BK = 64, STAGES = 4, kThreads = 256;
  static constexpr int kABytes = BM * BK * 2, kBBytes = BN * BK * 2;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kLdc = BN + 8;
  static constexpr int kPipeBytes = STAGES * kStageBytes;
  static constexpr int kSmemBytes = (kPipeBytes > BM * kLdc * 2 ? kPipeBytes : BM * kLdc * 2) + 1024;  // + alignment
};

template <typename T, bool B_RC>
__global__ void __launch_bounds__(WgmmaCfg::kThreads, 1) wgmma_forward_kernel(FwdParams<T> p) {
#if MS_GMM_HAS_WGMMA
  using C = WgmmaCfg;
  constexpr int NACC = C::BN / 2;  // accumulators per thread: 64 x 256 per warpgroup / 128 threads
  extern __shared__ char smem_raw[];
  // 128B-swizzled tiles must start on 1024-byte boundaries
  const uint32_t raw = detail::smem_u32(smem_raw);
  const uint32_t s0 = (raw + 1023u) & ~1023u;
  char* smem = smem_raw + (s0 - raw);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, wg = warp >> 2, wq = warp & 3;
  const int n_tiles = static_cast<int>((p.N + C::BN - 1) / C::BN);
  const int total = __ldg(p.mtile_start + p.E + 1) * n_tiles;
  const int K32 = static_cast<int>(p.K);
  for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const TileCoord t = detail::decode_tile(tile, n_tiles, p.E, C::BM, kBand, p.row_bounds, p.mtile_start);
    const bool real = t.g < p.E;
    const int n0 = t.n_tile * C::BN;
    const T* bg = real ? p.b + static_cast<int64_t>(t.g) * p.K * p.N : p.b;
    const Operand<T> A{p.a, p.lda, t.row_begin, t.row_end};
    const Operand<T> B{bg, B_RC ? p.K : p.N, n0, p.N};
    const int num_k = real ? (K32 + C::BK - 1) / C::BK : 0;
    float acc[NACC];
#pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = 0.f;

    Loader<T, true, C::BM, C::kThreads> la(A, 0, tid);
    Loader<T, B_RC, C::BN, C::kThreads, !B_RC> lb(B, 0, tid);
#pragma unroll
    for (int s = 0; s < C::STAGES - 1; ++s) {
      if (s < num_k) {
        la.load_and_advance(s0 + s * C::kStageBytes, K32);
        lb.load_and_advance(s0 + s * C::kStageBytes + C::kABytes, K32);
      }
      detail::cp_async_commit();
    }
    int read_stage = 0, write_stage = C::STAGES - 1;
    for (int kt = 0; kt < num_k; ++kt) {
      detail::cp_async_wait<C::STAGES - 2>();
      detail::fence_proxy_async_smem();
      __syncthreads();
      const uint32_t sa = s0 + read_stage * C::kStageBytes + wg * (64 * 128);  // this warpgroup's 64 rows
      const uint32_t sb = s0 + read_stage * C::kStageBytes + C::kABytes;
      detail::wgmma_fence();
#pragma unroll
      for (int j = 0; j < C::BK / 16; ++j) {
        const uint64_t da = detail::wgmma_desc(sa + j * 32, 16, 1024);
        const uint64_t db = B_RC ? detail::wgmma_desc(sb + j * 32, 16, 1024)
                                 : detail::wgmma_desc(sb + j * (16 * 128), 64 * 128, 1024);
        detail::wgmma_ss<T, C::BN, B_RC ? 0 : 1>(acc, da, db);
      }
      detail::wgmma_commit();
      if (kt + C::STAGES - 1 < num_k) {
        la.load_and_advance(s0 + write_stage * C::kStageBytes, K32);
        lb.load_and_advance(s0 + write_stage * C::kStageBytes + C::kABytes, K32);
      }
      detail::cp_async_commit();
      detail::wgmma_wait<0>();
      detail::fence_regs(acc);
      read_stage = read_stage == C::STAGES - 1 ? 0 : read_stage + 1;
      write_stage = write_stage == C::STAGES - 1 ? 0 : write_stage + 1;
    }
    detail::cp_async_wait<0>();
    __syncthreads();

    // epilogue: fragments (+ bias) -> padded staging tile -> 16-byte stores
    const float* bias = (real && p.bias != nullptr) ? p.bias + static_cast<int64_t>(t.g) * p.N : nullptr;
    const int N32 = static_cast<int>(p.N);
    T* sc = reinterpret_cast<T*>(smem);
    const int r = wg * 64 + wq * 16 + (lane >> 2);
#pragma unroll
    for (int j = 0; j < C::BN / 8; ++j) {
      const int c = j * 8 + (lane & 3) * 2;
      float b0 = 0.f, b1 = 0.f;
      if (bias != nullptr && n0 + c < N32) {
        const float2 bb = __ldg(reinterpret_cast<const float2*>(bias + n0 + c));
        b0 = bb.x;
        b1 = bb.y;
      }
      *reinterpret_cast<uint32_t*>(sc + r * C::kLdc + c) = detail::pack2<T>(acc[4 * j] + b0, acc[4 * j + 1] + b1);
      *reinterpret_cast<uint32_t*>(sc + (r + 8) * C::kLdc + c) =
          detail::pack2<T>(acc[4 * j + 2] + b0, acc[4 * j + 3] + b1);
    }
    __syncthreads();
    constexpr int kCpr = C::BN / 8;
#pragma unroll 4
    for (int i = tid; i < C::BM * kCpr; i += C::kThreads) {
      const int rr = i / kCpr, cc = i % kCpr;
      const int gr = t.row_begin + rr, gc = n0 + cc * 8;
      if (gr < t.row_end && gc < N32)
        *reinterpret_cast<uint4*>(p.out + static_cast<int64_t>(gr) * p.ldo + gc) =
            *reinterpret_cast<const uint4*>(sc + rr * C::kLdc + cc * 8);
    }
    __syncthreads();
  }
#else
  // Built without sm_90a code: the host never selects this kernel (it checks the binary version).
  __trap();
#endif
}

// Weight gradient: out[g] ([MO, NO], dense) = sum over rows r of group g of A[r, :]^T B[r, :], where
// A = pa [M, MO] (ld lda) and B = pb [M, NO] (ld ldb). Non-transposed: A = a, B = dy (out [K, N]);
// transpose_b: A = dy, B = a (out [N, K]).
template <typename T>
struct WgParams {
  const T* pa;
  int64_t lda;
  const T* pb;
  int64_t ldb;
  T* out;
  const void* offsets;
  bool i64;
  int64_t M, MO, NO;
  int64_t g_base;  // first group of this launch (gridDim.y is limited to 65535)
};

template <typename T, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::MIN_BLOCKS) mma_wgrad_kernel(WgParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) char smem[];
  const int64_t g = p.g_base + blockIdx.y;
  const int tiles_m = static_cast<int>((p.MO + Cfg::BM - 1) / Cfg::BM);
  const int m0 = static_cast<int>(blockIdx.x % tiles_m) * Cfg::BM;
  const int n0 = static_cast<int>(blockIdx.x / tiles_m) * Cfg::BN;
  int64_t start, end;
  detail::group_rows(p.offsets, p.i64, g, p.M, start, end);
  const Operand<T> A{p.pa, p.lda, m0, p.MO};
  const Operand<T> B{p.pb, p.ldb, n0, p.NO};
  float acc[Cfg::MI][Cfg::NI][4];
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < Cfg::NI; ++ni)
#pragma unroll
      for (int v = 0; v < 4; ++v) acc[mi][ni][v] = 0.f;
  mma_mainloop<T, Cfg, false, false>(acc, smem, A, B, start, end);
  mma_epilogue<T, Cfg>(acc, smem, p.out + g * p.MO * p.NO, p.NO, m0, static_cast<int>(p.MO), n0,
                       static_cast<int>(p.NO), nullptr);
#endif
}

// ================================================================================================
// SIMT tiled GEMM (every dtype, any shape and alignment)

template <typename T>
struct SimtCfg;
// float32 and the 16-bit fallback: 128x128x8, 8x8 outputs per thread.
template <typename T>
struct SimtCfg {
  static constexpr int BM = 128, BN = 128, BK = 8, TM = 8, TN = 8;
  static constexpr int kThreads = (BM / TM) * (BN / TN);
};
// float64: 64x64x8, 4x4 outputs per thread (64 double accumulators would spill).
template <>
struct SimtCfg<double> {
  static constexpr int BM = 64, BN = 64, BK = 8, TM = 4, TN = 4;
  static constexpr int kThreads = (BM / TM) * (BN / TN);
};

// Global -> register -> shared copier of one SIMT operand slab (BO x BK elements, NT threads).
// Element i of a thread is (o, k) with the contiguous global dimension fastest across threads, so
// each thread keeps one of o / k fixed and steps the other by a constant: one base pointer, no
// divisions in the loop. Bounds are checked per element (any shape, any alignment).
template <typename T, bool RC, int BO, int BK, int NT>
struct SimtLoader {
  using Acc = acc_t<T>;
  static constexpr int N = BO * BK / NT;
  static constexpr int kStep = RC ? NT / BK : NT / BO;  // o step (RC) or k step per element
  static_assert(N * NT == BO * BK && (RC ? NT % BK : NT % BO) == 0, "loader mapping");
  const T* base;  // element 0 at k0 = 0
  int64_t ld;
  int64_t o_lim;  // valid o < o_lim (tile-relative)
  int o_t, k_t;   // element 0's tile coordinates

  __device__ __forceinline__ SimtLoader(const Operand<T>& op, int tid) {
    o_t = RC ? tid / BK : tid % BO;
    k_t = RC ? tid % BK : tid / BO;
    ld = op.ld;
    o_lim = op.o_end - op.o_begin;
    base = RC ? op.ptr + (op.o_begin + o_t) * op.ld + k_t : op.ptr + k_t * op.ld + op.o_begin + o_t;
  }
  __device__ __forceinline__ void load(Acc (&r)[N], int64_t k0, int64_t k_end) const {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      bool ok;
      const T* src;
      if constexpr (RC) {
        ok = o_t + i * kStep < o_lim && k0 + k_t < k_end;
        src = base + static_cast<int64_t>(i * kStep) * ld + k0;
      } else {
        ok = o_t < o_lim && k0 + k_t + i * kStep < k_end;
        src = base + (k0 + i * kStep) * ld;
      }
      r[i] = ok ? detail::to_acc(__ldg(src)) : Acc(0);
    }
  }
  // shared slab is [BK][L] (o contiguous)
  __device__ __forceinline__ void store(Acc* s, int L, const Acc (&r)[N]) const {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if constexpr (RC)
        s[k_t * L + o_t + i * kStep] = r[i];
      else
        s[(k_t + i * kStep) * L + o_t] = r[i];
    }
  }
};

// acc[i][j] += sum_k A(o_a = A.o_begin + ty + i * TY, k) * B(k, o_b = B.o_begin + tx + j * TX) over
// k in [k_begin, k_end); one k-slab in shared memory, the next one prefetched into registers while
// the current one is multiplied.
template <typename T, bool A_RC, bool B_RC>
__device__ __forceinline__ void simt_mainloop(acc_t<T> (&acc)[SimtCfg<T>::TM][SimtCfg<T>::TN],
                                              const Operand<T>& A, const Operand<T>& B, int64_t k_begin,
                                              int64_t k_end) {
  using Acc = acc_t<T>;
  using C = SimtCfg<T>;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, TM = C::TM, TN = C::TN, NT = C::kThreads;
  constexpr int TX = BN / TN, TY = BM / TM;
  constexpr int LA = BM + 4, LB = BN + 4;  // +4: the transposing stores hit distinct banks
  constexpr int NA = BM * BK / NT, NB = BN * BK / NT;
  static_assert(NA * NT == BM * BK && NB * NT == BN * BK, "loader mapping");
  __shared__ Acc sa[BK * LA];
  __shared__ Acc sb[BK * LB];
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
  Acc ra[NA], rb[NB];

  SimtLoader<T, A_RC, BM, BK, NT> la(A, tid);
  SimtLoader<T, B_RC, BN, BK, NT> lb(B, tid);
  const int64_t num_k = (k_end - k_begin + BK - 1) / BK;
  if (num_k > 0) {
    la.load(ra, k_begin, k_end);
    lb.load(rb, k_begin, k_end);
  }
  for (int64_t kt = 0; kt < num_k; ++kt) {
    la.store(sa, LA, ra);
    lb.store(sb, LB, rb);
    __syncthreads();
    if (kt + 1 < num_k) {
      la.load(ra, k_begin + (kt + 1) * BK, k_end);
      lb.load(rb, k_begin + (kt + 1) * BK, k_end);
    }
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      Acc av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = sa[k * LA + ty + i * TY];
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = sb[k * LB + tx + j * TX];
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(av[i], bv[j], acc[i][j]);
    }
    __syncthreads();
  }
}

template <typename T>
__device__ __forceinline__ void simt_epilogue(const acc_t<T> (&acc)[SimtCfg<T>::TM][SimtCfg<T>::TN],
                                              T* out, int64_t ldo, int64_t row0, int64_t row_end, int64_t col0,
                                              int64_t col_end, const acc_t<T>* bias) {
  using C = SimtCfg<T>;
  constexpr int TX = C::BN / C::TN, TY = C::BM / C::TM;
  const int tid = threadIdx.x, tx = tid % TX, ty = tid / TX;
#pragma unroll
  for (int j = 0; j < C::TN; ++j) {
    const int64_t col = col0 + tx + j * TX;
    if (col >= col_end) continue;
    const acc_t<T> bj = bias != nullptr ? bias[col] : 0;
#pragma unroll
    for (int i = 0; i < C::TM; ++i) {
      const int64_t row = row0 + ty + i * TY;
      if (row < row_end) out[row * ldo + col] = detail::from_acc<T>(acc[i][j] + bj);
    }
  }
}

template <typename T, bool B_RC>
__global__ void __launch_bounds__(SimtCfg<T>::kThreads, 2) simt_forward_kernel(FwdParams<T> p) {
  using C = SimtCfg<T>;
  using Acc = acc_t<T>;
  const int n_tiles = static_cast<int>((p.N + C::BN - 1) / C::BN);
  const int total = __ldg(p.mtile_start + p.E + 1) * n_tiles;
  for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const TileCoord t = detail::decode_tile(tile, n_tiles, p.E, C::BM, kBand, p.row_bounds, p.mtile_start);
    const bool real = t.g < p.E;
    const int64_t n0 = static_cast<int64_t>(t.n_tile) * C::BN;
    const T* bg = real ? p.b + static_cast<int64_t>(t.g) * p.K * p.N : p.b;
    const Operand<T> A{p.a, p.lda, t.row_begin, t.row_end};
    const Operand<T> B{bg, B_RC ? p.K : p.N, n0, p.N};
    Acc acc[C::TM][C::TN];
#pragma unroll
    for (int i = 0; i < C::TM; ++i)
#pragma unroll
      for (int j = 0; j < C::TN; ++j) acc[i][j] = 0;
    simt_mainloop<T, true, B_RC>(acc, A, B, 0, real ? p.K : 0);
    const Acc* bias = (real && p.bias != nullptr) ? p.bias + static_cast<int64_t>(t.g) * p.N : nullptr;
    simt_epilogue<T>(acc, p.out, p.ldo, t.row_begin, t.row_end, n0, p.N, bias);
  }
}

template <typename T>
__global__ void __launch_bounds__(SimtCfg<T>::kThreads, 2) simt_wgrad_kernel(WgParams<T> p) {
  using C = SimtCfg<T>;
  using Acc = acc_t<T>;
  const int64_t g = p.g_base + blockIdx.y;
  const int tiles_m = static_cast<int>((p.MO + C::BM - 1) / C::BM);
  const int64_t m0 = static_cast<int64_t>(blockIdx.x % tiles_m) * C::BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x / tiles_m) * C::BN;
  int64_t start, end;
  detail::group_rows(p.offsets, p.i64, g, p.M, start, end);
  const Operand<T> A{p.pa, p.lda, m0, p.MO};
  const Operand<T> B{p.pb, p.ldb, n0, p.NO};
  Acc acc[C::TM][C::TN];
#pragma unroll
  for (int i = 0; i < C::TM; ++i)
#pragma unroll
    for (int j = 0; j < C::TN; ++j) acc[i][j] = 0;
  simt_mainloop<T, false, false>(acc, A, B, start, end);
  simt_epilogue<T>(acc, p.out + g * p.MO * p.NO, p.NO, m0, p.MO, n0, p.NO, nullptr);
}

// ================================================================================================
// decode GEMV: a few rows per group, time bound by reading the expert weights
//
// Work item = (group, chunk of up to R rows, slice of columns), scheduled like the GEMM tiles
// (bm = R). Every item streams its slice of b[g] exactly once with 16-byte loads that bypass L1,
// while the group's rows of a (small, shared by all warps) are read through L1.

constexpr int kGemvThreads = 256;

// transpose_b, b[g] is [N, K]: warp w owns NC columns; lanes split K in 16-byte pieces and the
// partial dot products are reduced with a fixed xor-shuffle tree.
template <typename T, int R, int NC>
__global__ void __launch_bounds__(kGemvThreads, 2) gemv_nk_kernel(FwdParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int VEC = 16 / sizeof(T);
  constexpr int NS = (kGemvThreads / 32) * NC;  // columns per item
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int n_tiles = static_cast<int>((p.N + NS - 1) / NS);
  const int total = __ldg(p.mtile_start + p.E + 1) * n_tiles;
  for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const TileCoord t = detail::decode_tile(tile, n_tiles, p.E, R, INT_MAX / 2, p.row_bounds, p.mtile_start);
    const int64_t n0 = static_cast<int64_t>(t.n_tile) * NS;
    const int nrows = min(R, t.row_end - t.row_begin);
    if (t.g >= p.E) {  // tail rows: zeros
      for (int i = tid; i < R * NS; i += kGemvThreads) {
        const int r = i / NS, c = i % NS;
        if (r < nrows && n0 + c < p.N) p.out[(t.row_begin + r) * p.ldo + n0 + c] = detail::from_acc<T>(0.f);
      }
      continue;
    }
    const T* bg = p.b + static_cast<int64_t>(t.g) * p.K * p.N;
    const T* arow = p.a + static_cast<int64_t>(t.row_begin) * p.lda;
    const int64_t c0 = n0 + warp * NC;
    float acc[R][NC];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < NC; ++j) acc[r][j] = 0.f;

    auto fma_step = [&](const uint4 (&bv)[NC], int64_t k) {
      float bf[NC][VEC];
#pragma unroll
      for (int j = 0; j < NC; ++j) detail::unpack16(bv[j], bf[j], static_cast<T*>(nullptr));
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < nrows) {
          float af[VEC];
          detail::unpack16(detail::ld_nc16(arow + r * p.lda + k), af, static_cast<T*>(nullptr));
#pragma unroll
          for (int j = 0; j < NC; ++j)
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[r][j] = fmaf(af[v], bf[j][v], acc[r][j]);
        }
      }
    };
    const uint4 zero = make_uint4(0, 0, 0, 0);
    int64_t k = static_cast<int64_t>(lane) * VEC;
    // two steps per iteration: 2 * NC independent 16-byte weight loads in flight per lane
    for (; k + 32 * VEC < p.K; k += 64 * VEC) {
      uint4 b0[NC], b1[NC];
#pragma unroll
      for (int j = 0; j < NC; ++j) {
        const bool ok = c0 + j < p.N;
        b0[j] = ok ? detail::ld_stream16(bg + (c0 + j) * p.K + k) : zero;
        b1[j] = ok ? detail::ld_stream16(bg + (c0 + j) * p.K + k + 32 * VEC) : zero;
      }
      fma_step(b0, k);
      fma_step(b1, k + 32 * VEC);
    }
    if (k < p.K) {
      uint4 b0[NC];
#pragma unroll
      for (int j = 0; j < NC; ++j) b0[j] = c0 + j < p.N ? detail::ld_stream16(bg + (c0 + j) * p.K + k) : zero;
      fma_step(b0, k);
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < NC; ++j)
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[r][j] += __shfl_xor_sync(0xffffffffu, acc[r][j], off);
    // lane r * NC + j writes (row r, column c0 + j); compile-time indices keep acc in registers
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int j = 0; j < NC; ++j) {
        if (lane == r * NC + j && r < nrows && c0 + j < p.N) {
          const float bj = p.bias != nullptr ? p.bias[static_cast<int64_t>(t.g) * p.N + c0 + j] : 0.f;
          p.out[(t.row_begin + r) * p.ldo + c0 + j] = detail::from_acc<T>(acc[r][j] + bj);
        }
      }
  }
#endif
}

// b[g] is [K, N]: thread (kk, nn) owns VEC columns n0 + nn * VEC and the k's congruent to kk
// modulo 64; partial sums are reduced with xor shuffles inside the warp, then across the eight
// warps in warp order through shared memory.
template <typename T, int R>
__global__ void __launch_bounds__(kGemvThreads, 2) gemv_kn_kernel(FwdParams<T> p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  constexpr int VEC = 16 / sizeof(T);
  constexpr int TN = 4;                   // threads along n: 4 x 16 B = 64 contiguous bytes per k
  constexpr int NS = TN * VEC;            // columns per item
  constexpr int TK = kGemvThreads / TN;   // k stride
  constexpr int kWarps = kGemvThreads / 32;
  __shared__ float s_red[kWarps][R][NS];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int kk = tid / TN, nn = tid % TN;
  const int n_tiles = static_cast<int>((p.N + NS - 1) / NS);
  const int total = __ldg(p.mtile_start + p.E + 1) * n_tiles;
  for (int tile = blockIdx.x; tile < total; tile += gridDim.x) {
    const TileCoord t = detail::decode_tile(tile, n_tiles, p.E, R, INT_MAX / 2, p.row_bounds, p.mtile_start);
    const int64_t n0 = static_cast<int64_t>(t.n_tile) * NS;
    const int nrows = min(R, t.row_end - t.row_begin);
    if (t.g >= p.E) {
      for (int i = tid; i < R * NS; i += kGemvThreads) {
        const int r = i / NS, c = i % NS;
        if (r < nrows && n0 + c < p.N) p.out[(t.row_begin + r) * p.ldo + n0 + c] = detail::from_acc<T>(0.f);
      }
      continue;
    }
    const T* bg = p.b + static_cast<int64_t>(t.g) * p.K * p.N;
    const T* arow = p.a + static_cast<int64_t>(t.row_begin) * p.lda;
    const int64_t col = n0 + nn * VEC;
    const bool col_ok = col < p.N;
    float acc[R][VEC];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int v = 0; v < VEC; ++v) acc[r][v] = 0.f;

    auto fma_step = [&](const uint4& bv, int64_t k) {
      float bf[VEC];
      detail::unpack16(bv, bf, static_cast<T*>(nullptr));
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < nrows) {
          const float av = detail::to_acc(__ldg(arow + r * p.lda + k));
#pragma unroll
          for (int v = 0; v < VEC; ++v) acc[r][v] = fmaf(av, bf[v], acc[r][v]);
        }
      }
    };
    const uint4 zero = make_uint4(0, 0, 0, 0);
    int64_t k = kk;
    // U k rows per iteration: U independent 16-byte weight loads in flight per thread (U = 2 for
    // R = 8, whose 64 accumulators leave fewer registers under the 128 of two CTAs per SM)
    constexpr int U = R >= 8 ? 2 : 4;
    for (; k + (U - 1) * TK < p.K; k += U * TK) {
      uint4 bv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) bv[u] = col_ok ? detail::ld_stream16(bg + (k + u * TK) * p.N + col) : zero;
#pragma unroll
      for (int u = 0; u < U; ++u) fma_step(bv[u], k + u * TK);
    }
    for (; k < p.K; k += TK) {
      const uint4 bv = col_ok ? detail::ld_stream16(bg + k * p.N + col) : zero;
      fma_step(bv, k);
    }
    // lanes nn + 4 * x (x = 0..7) of a warp share columns: reduce over x
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        float s = acc[r][v];
        s += __shfl_xor_sync(0xffffffffu, s, 4);
        s += __shfl_xor_sync(0xffffffffu, s, 8);
        s += __shfl_xor_sync(0xffffffffu, s, 16);
        acc[r][v] = s;
      }
    if (lane < TN) {
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int v = 0; v < VEC; ++v) s_red[warp][r][lane * VEC + v] = acc[r][v];
    }
    __syncthreads();
    for (int i = tid; i < R * NS; i += kGemvThreads) {
      const int r = i / NS, c = i % NS;
      if (r < nrows && n0 + c < p.N) {
        float s = 0.f;
#pragma unroll
        for (int w = 0; w < kWarps; ++w) s += s_red[w][r][c];
        if (p.bias != nullptr) s += p.bias[static_cast<int64_t>(t.g) * p.N + n0 + c];
        p.out[(t.row_begin + r) * p.ldo + n0 + c] = detail::from_acc<T>(s);
      }
    }
    __syncthreads();
  }
#endif
}

// ================================================================================================
// bias gradient: out[g, n] = sum over the group's rows of dy[r, n]. Block (32, 8): column
// blockIdx.x * 32 + threadIdx.x, rows strided by 8, then the 8 partials summed in order.

template <typename T>
__global__ void __launch_bounds__(256) bias_grad_kernel(const T* __restrict__ dy, int64_t ldd,
                                                        const void* __restrict__ offsets, bool i64, T* __restrict__ out,
                                                        int64_t M, int64_t N, int64_t g_base) {
  using Acc = acc_t<T>;
  __shared__ Acc red[8][33];
  const int64_t g = g_base + blockIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  int64_t start, end;
  detail::group_rows(offsets, i64, g, M, start, end);
  Acc s = 0;
  if (col < N)
    for (int64_t r = start + threadIdx.y; r < end; r += 8) s += detail::to_acc(__ldg(dy + r * ldd + col));
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < N) {
    Acc total = red[0][threadIdx.x];
#pragma unroll
    for (int y = 1; y < 8; ++y) total += red[y][threadIdx.x];
    out[g * N + col] = detail::from_acc<T>(total);
  }
}

// ================================================================================================
// host side

// Per-kernel launch state: whether the dynamic shared-memory limit was raised on a device, and the
// occupancy (blocks per SM) that sizes persistent grids.
template <auto Kernel>
struct KernelState {
  static std::atomic<unsigned long long> attr_set;
  static std::atomic<int> occupancy;
};
template <auto Kernel>
std::atomic<unsigned long long> KernelState<Kernel>::attr_set{0};
template <auto Kernel>
std::atomic<int> KernelState<Kernel>::occupancy{0};

template <auto Kernel>
cudaError_t prepare(int threads, int smem, int* blocks_per_sm) {
  if (smem > 48 * 1024) {
    int dev = 0;
    cudaError_t e = cudaGetDevice(&dev);
    if (e != cudaSuccess) return e;
    const unsigned long long bit = dev < 64 ? (1ull << dev) : 0ull;
    if (bit == 0 || !(KernelState<Kernel>::attr_set.load() & bit)) {
      e = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (e != cudaSuccess) return e;
      KernelState<Kernel>::attr_set.fetch_or(bit);
    }
  }
  if (blocks_per_sm != nullptr) {
    int occ = KernelState<Kernel>::occupancy.load();
    if (occ == 0) {
      cudaError_t e = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, Kernel, threads, smem);
      if (e != cudaSuccess) return e;
      occ = occ < 1 ? 1 : occ;
      KernelState<Kernel>::occupancy.store(occ);
    }
    *blocks_per_sm = occ;
  }
  return cudaSuccess;
}

int elem_size(FloatKind d) {
  switch (d) {
    case FloatKind::kFloat64:
      return 8;
    case FloatKind::kFloat32:
      return 4;
    default:
      return 2;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Upper bound of the M-tiles of all groups (the tail included): sum_g ceil(m_g / bm) <= M / bm + E + 1.
int64_t max_mtiles(int64_t M, int64_t E, int bm) { return M / bm + E + 1; }

bool tiles_fit(int64_t M, int64_t E, int bm, int64_t n_tiles) {
  return max_mtiles(M, E, bm) * n_tiles < static_cast<int64_t>(INT_MAX);
}

// Average rows per group up to which the decode GEMV runs (auto mode). Each item multiplies up to
// R = 8 rows by one read of the weights; groups above R rows re-read the weight slice (from L2).
constexpr int64_t kGemvMaxAvgRows = 8;
// Average rows per group below which the 64-row tensor-core tile is used.
constexpr int64_t kSmallTileMaxAvgRows = 96;

enum class FwdKernel { kSimt, kMmaLarge, kMmaSmall, kGemv, kWgmma };

template <typename T>
cudaError_t run_schedule(const ForwardArgs& p, int bm, int* ws, cudaStream_t stream) {
  schedule_kernel<<<1, kScheduleThreads, 0, stream>>>(p.offsets, p.offsets_int64, static_cast<int>(p.E),
                                                      static_cast<int>(p.M), bm, ws, ws + p.E + 2);
  return cudaGetLastError();
}

template <typename T>
FwdParams<T> fwd_params(const ForwardArgs& p, const int* ws) {
  FwdParams<T> k;
  k.a = static_cast<const T*>(p.a);
  k.lda = p.lda;
  k.b = static_cast<const T*>(p.b);
  k.bias = static_cast<const acc_t<T>*>(p.bias);
  k.out = static_cast<T*>(p.out);
  k.ldo = p.ldo;
  k.N = p.N;
  k.K = p.K;
  k.E = static_cast<int>(p.E);
  k.row_bounds = ws;
  k.mtile_start = ws + p.E + 2;
  return k;
}

// Schedules with `bm`-row tiles and launches `Kernel` on a persistent grid of at most
// sm_count * occupancy CTAs (never more than the tile bound).
template <typename T, auto Kernel>
cudaError_t launch_persistent(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream, int bm,
                              int64_t n_tiles, int threads, int smem) {
  int occ = 1;
  cudaError_t e = prepare<Kernel>(threads, smem, &occ);
  if (e != cudaSuccess) return e;
  e = run_schedule<T>(p, bm, ws, stream);
  if (e != cudaSuccess) return e;
  const int64_t bound = max_mtiles(p.M, p.E, bm) * n_tiles;
  int64_t grid = static_cast<int64_t>(dev.sm_count > 0 ? dev.sm_count : 1) * occ;
  grid = grid < bound ? grid : bound;
  if (grid < 1) grid = 1;
  Kernel<<<static_cast<unsigned>(grid), threads, smem, stream>>>(fwd_params<T>(p, ws));
  return cudaGetLastError();
}

int gemv_rows(int64_t M, int64_t E) {
  const int64_t avg = ceil_div(M, E > 0 ? E : 1);
  return avg <= 1 ? 1 : avg <= 2 ? 2 : avg <= 4 ? 4 : 8;
}

template <typename T, int R>
cudaError_t launch_gemv_r(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream) {
  if (p.transpose_b) {
    constexpr int NC = 4;
    constexpr int NS = (kGemvThreads / 32) * NC;
    return launch_persistent<T, gemv_nk_kernel<T, R, NC>>(p, dev, ws, stream, R, ceil_div(p.N, NS), kGemvThreads,
                                                          0);
  }
  constexpr int NS = 4 * (16 / sizeof(T));
  return launch_persistent<T, gemv_kn_kernel<T, R>>(p, dev, ws, stream, R, ceil_div(p.N, NS), kGemvThreads, 0);
}

template <typename T>
cudaError_t launch_gemv(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream) {
  switch (gemv_rows(p.M, p.E)) {
    case 1:
      return launch_gemv_r<T, 1>(p, dev, ws, stream);
    case 2:
      return launch_gemv_r<T, 2>(p, dev, ws, stream);
    case 4:
      return launch_gemv_r<T, 4>(p, dev, ws, stream);
    default:
      return launch_gemv_r<T, 8>(p, dev, ws, stream);
  }
}

template <typename T, class Cfg>
cudaError_t launch_mma(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream) {
  const int64_t n_tiles = ceil_div(p.N, Cfg::BN);
  if (p.transpose_b)
    return launch_persistent<T, mma_forward_kernel<T, Cfg, true>>(p, dev, ws, stream, Cfg::BM, n_tiles,
                                                                  Cfg::kThreads, Cfg::kSmemBytes);
  return launch_persistent<T, mma_forward_kernel<T, Cfg, false>>(p, dev, ws, stream, Cfg::BM, n_tiles,
                                                                 Cfg::kThreads, Cfg::kSmemBytes);
}

template <typename T>
cudaError_t launch_wgmma(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream) {
  using C = WgmmaCfg;
  const int64_t n_tiles = ceil_div(p.N, C::BN);
  if (p.transpose_b)
    return launch_persistent<T, wgmma_forward_kernel<T, true>>(p, dev, ws, stream, C::BM, n_tiles, C::kThreads,
                                                               C::kSmemBytes);
  return launch_persistent<T, wgmma_forward_kernel<T, false>>(p, dev, ws, stream, C::BM, n_tiles, C::kThreads,
                                                              C::kSmemBytes);
}

// Whether the wgmma kernel can run on the current device: compute capability 9.0 and a binary
// built for sm_90a (a build without it would run the kernel's stub). Cached per device.
bool wgmma_available(const Device& dev) {
  if (dev.cc_major != 9 || dev.cc_minor != 0) return false;
  static std::atomic<int> cached{-1};
  int v = cached.load();
  if (v < 0) {
    cudaFuncAttributes attr{};
    v = (cudaFuncGetAttributes(&attr, wgmma_forward_kernel<__nv_bfloat16, true>) == cudaSuccess &&
         attr.binaryVersion >= 90)
            ? 1
            : 0;
    cudaGetLastError();  // a failed query must not leak into the next launch check
    cached.store(v);
  }
  return v == 1;
}

template <typename T>
cudaError_t launch_simt(const ForwardArgs& p, const Device& dev, int* ws, cudaStream_t stream) {
  using C = SimtCfg<T>;
  const int64_t n_tiles = ceil_div(p.N, C::BN);
  if (p.transpose_b)
    return launch_persistent<T, simt_forward_kernel<T, true>>(p, dev, ws, stream, C::BM, n_tiles, C::kThreads, 0);
  return launch_persistent<T, simt_forward_kernel<T, false>>(p, dev, ws, stream, C::BM, n_tiles, C::kThreads, 0);
}

struct FwdChoice {
  Impl impl;
  FwdKernel kernel;
};

FwdChoice choose_forward(const ForwardArgs& p, Impl requested, const Device& dev) {
  const bool half = p.dtype == FloatKind::kBFloat16 || p.dtype == FloatKind::kFloat16;
  const int vec = 16 / elem_size(p.dtype);
  const bool vec_ok = p.K % vec == 0 && p.N % vec == 0 && p.lda % vec == 0 && p.ldo % vec == 0 && aligned16(p.a) &&
                      aligned16(p.b) && aligned16(p.out);
  const bool sm80 = dev.cc_major >= 8;
  const bool mma_ok = half && vec_ok && sm80;
  const bool gemv_ok = p.dtype != FloatKind::kFloat64 && vec_ok && sm80 &&
                       tiles_fit(p.M, p.E, gemv_rows(p.M, p.E), ceil_div(p.N, 4 * vec));
  const int64_t E1 = p.E > 0 ? p.E : 1;
  const FwdKernel mma_kernel = ceil_div(p.M, E1) <= kSmallTileMaxAvgRows ? FwdKernel::kMmaSmall : FwdKernel::kMmaLarge;
  switch (requested) {
    case Impl::kSimt:
      return {Impl::kSimt, FwdKernel::kSimt};
    case Impl::kGemv:
      return gemv_ok ? FwdChoice{Impl::kGemv, FwdKernel::kGemv} : FwdChoice{Impl::kSimt, FwdKernel::kSimt};
    case Impl::kMma:
      return mma_ok ? FwdChoice{Impl::kMma, mma_kernel} : FwdChoice{Impl::kSimt, FwdKernel::kSimt};
    case Impl::kWgmma:
      if (mma_ok && wgmma_available(dev)) return {Impl::kWgmma, FwdKernel::kWgmma};
      return mma_ok ? FwdChoice{Impl::kMma, mma_kernel} : FwdChoice{Impl::kSimt, FwdKernel::kSimt};
    case Impl::kAuto:
    default:
      if (gemv_ok && p.M <= kGemvMaxAvgRows * E1) return {Impl::kGemv, FwdKernel::kGemv};
      if (mma_ok) return {Impl::kMma, mma_kernel};
      return {Impl::kSimt, FwdKernel::kSimt};
  }
}

template <typename T>
cudaError_t forward_typed(const ForwardArgs& p, FwdKernel kernel, const Device& dev, int* ws, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {
    if (kernel == FwdKernel::kMmaLarge) return launch_mma<T, CfgLarge>(p, dev, ws, stream);
    if (kernel == FwdKernel::kMmaSmall) return launch_mma<T, CfgSmall>(p, dev, ws, stream);
    if (kernel == FwdKernel::kWgmma) return launch_wgmma<T>(p, dev, ws, stream);
  }
  if constexpr (!std::is_same<T, double>::value) {
    if (kernel == FwdKernel::kGemv) return launch_gemv<T>(p, dev, ws, stream);
  }
  return launch_simt<T>(p, dev, ws, stream);
}

// ---- weight gradient ----------------------------------------------------------------------------

template <typename T>
WgParams<T> wg_params(const WeightGradArgs& p) {
  WgParams<T> k;
  // non-transposed: out [K, N] = a^T dy; transpose_b: out [N, K] = dy^T a
  k.pa = static_cast<const T*>(p.transpose_b ? p.dy : p.a);
  k.lda = p.transpose_b ? p.ldd : p.lda;
  k.pb = static_cast<const T*>(p.transpose_b ? p.a : p.dy);
  k.ldb = p.transpose_b ? p.lda : p.ldd;
  k.out = static_cast<T*>(p.out);
  k.offsets = p.offsets;
  k.i64 = p.offsets_int64;
  k.M = p.M;
  k.MO = p.transpose_b ? p.N : p.K;
  k.NO = p.transpose_b ? p.K : p.N;
  k.g_base = 0;
  return k;
}

constexpr int64_t kMaxGridY = 65535;

template <typename T, auto Kernel>
cudaError_t launch_per_group(WgParams<T> k, int64_t E, int64_t tiles, int threads, int smem, cudaStream_t stream) {
  if (tiles > static_cast<int64_t>(INT_MAX)) return cudaErrorInvalidConfiguration;
  cudaError_t e = prepare<Kernel>(threads, smem, nullptr);
  if (e != cudaSuccess) return e;
  for (int64_t g0 = 0; g0 < E; g0 += kMaxGridY) {
    k.g_base = g0;
    const int64_t ng = E - g0 < kMaxGridY ? E - g0 : kMaxGridY;
    Kernel<<<dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(ng)), threads, smem, stream>>>(k);
    e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t weight_grad_typed(const WeightGradArgs& p, Impl impl, cudaStream_t stream) {
  const WgParams<T> k = wg_params<T>(p);
  if constexpr (sizeof(T) == 2) {
    if (impl == Impl::kMma) {
      using Cfg = CfgLarge;
      const int64_t tiles = ceil_div(k.MO, Cfg::BM) * ceil_div(k.NO, Cfg::BN);
      return launch_per_group<T, mma_wgrad_kernel<T, Cfg>>(k, p.E, tiles, Cfg::kThreads, Cfg::kSmemBytes, stream);
    }
  }
  using C = SimtCfg<T>;
  const int64_t tiles = ceil_div(k.MO, C::BM) * ceil_div(k.NO, C::BN);
  return launch_per_group<T, simt_wgrad_kernel<T>>(k, p.E, tiles, C::kThreads, 0, stream);
}

}  // namespace

// ================================================================================================
// public entry points

int64_t forward_workspace_ints(int64_t E) { return 2 * (E + 2); }

bool forward_shape_supported(int64_t M, int64_t N, int64_t K, int64_t E) {
  // 2^30 keeps the schedule's and the loaders' int32 arithmetic exact; 64 x 64 is the smallest tile
  // of the GEMM kernels (the GEMV's own bound is checked when it is chosen).
  constexpr int64_t kLim = int64_t(1) << 30;
  return M < kLim && N < kLim && K < kLim && E < kLim && tiles_fit(M, E, 64, ceil_div(N, 64));
}

Impl forward_impl(const ForwardArgs& p, Impl requested, const Device& dev) {
  return choose_forward(p, requested, dev).impl;
}

cudaError_t grouped_mm_forward(const ForwardArgs& p, Impl requested, const Device& dev, int* workspace,
                               cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0) return cudaSuccess;
  if (!forward_shape_supported(p.M, p.N, p.K, p.E)) return cudaErrorInvalidValue;
  const FwdChoice c = choose_forward(p, requested, dev);
  switch (p.dtype) {
    case FloatKind::kFloat32:
      return forward_typed<float>(p, c.kernel, dev, workspace, stream);
    case FloatKind::kFloat64:
      return forward_typed<double>(p, c.kernel, dev, workspace, stream);
    case FloatKind::kBFloat16:
      return forward_typed<__nv_bfloat16>(p, c.kernel, dev, workspace, stream);
    case FloatKind::kFloat16:
      return forward_typed<__half>(p, c.kernel, dev, workspace, stream);
  }
  return cudaErrorInvalidValue;
}

Impl weight_grad_impl(const WeightGradArgs& p, Impl requested, const Device& dev) {
  const bool half = p.dtype == FloatKind::kBFloat16 || p.dtype == FloatKind::kFloat16;
  const bool aligned = p.K % 8 == 0 && p.N % 8 == 0 && p.lda % 8 == 0 && p.ldd % 8 == 0 && aligned16(p.a) &&
                       aligned16(p.dy) && aligned16(p.out);
  const bool mma_ok = half && aligned && dev.cc_major >= 8;
  if (requested == Impl::kSimt || requested == Impl::kGemv) return Impl::kSimt;
  return mma_ok ? Impl::kMma : Impl::kSimt;
}

cudaError_t grouped_mm_weight_grad(const WeightGradArgs& p, Impl requested, const Device& dev,
                                   cudaStream_t stream) {
  if (p.E <= 0 || p.K <= 0 || p.N <= 0) return cudaSuccess;
  const Impl impl = weight_grad_impl(p, requested, dev);
  switch (p.dtype) {
    case FloatKind::kFloat32:
      return weight_grad_typed<float>(p, impl, stream);
    case FloatKind::kFloat64:
      return weight_grad_typed<double>(p, impl, stream);
    case FloatKind::kBFloat16:
      return weight_grad_typed<__nv_bfloat16>(p, impl, stream);
    case FloatKind::kFloat16:
      return weight_grad_typed<__half>(p, impl, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t grouped_bias_grad(const BiasGradArgs& p, cudaStream_t stream) {
  if (p.E <= 0 || p.N <= 0) return cudaSuccess;
  const int64_t col_blocks = ceil_div(p.N, 32);
  if (col_blocks > static_cast<int64_t>(INT_MAX)) return cudaErrorInvalidConfiguration;
  auto run = [&](auto* tag) -> cudaError_t {
    using T = std::remove_pointer_t<decltype(tag)>;
    for (int64_t g0 = 0; g0 < p.E; g0 += kMaxGridY) {
      const int64_t ng = p.E - g0 < kMaxGridY ? p.E - g0 : kMaxGridY;
      bias_grad_kernel<T><<<dim3(static_cast<unsigned>(col_blocks), static_cast<unsigned>(ng)), dim3(32, 8), 0,
                            stream>>>(static_cast<const T*>(p.dy), p.ldd, p.offsets, p.offsets_int64,
                                      static_cast<T*>(p.out), p.M, p.N, g0);
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) return e;
    }
    return cudaSuccess;
  };
  switch (p.dtype) {
    case FloatKind::kFloat32:
      return run(static_cast<float*>(nullptr));
    case FloatKind::kFloat64:
      return run(static_cast<double*>(nullptr));
    case FloatKind::kBFloat16:
      return run(static_cast<__nv_bfloat16*>(nullptr));
    case FloatKind::kFloat16:
      return run(static_cast<__half*>(nullptr));
  }
  return cudaErrorInvalidValue;
}

}  // namespace gmm
}  // namespace moestream
