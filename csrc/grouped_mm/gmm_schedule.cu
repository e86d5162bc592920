// The schedule kernel of the grouped-matmul forward: one 1024-thread CTA turns offsets (device
// memory) into per-group row bounds and M-tile prefix sums (see gmm_schedule.cuh), so the forward
// kernels map a linear tile id to (group, m-tile, n-tile) without the host ever reading offsets.
#include "grouped_mm/gmm_schedule.cuh"

namespace moestream {
namespace gmm {
namespace detail {
namespace {

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

}  // namespace

cudaError_t run_schedule(const ForwardArgs& p, int bm, int* ws, cudaStream_t stream) {
  schedule_kernel<<<1, kScheduleThreads, 0, stream>>>(p.offsets, p.offsets_int64, static_cast<int>(p.E),
                                                      static_cast<int>(p.M), bm, ws, ws + p.E + 2);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace gmm
}  // namespace moestream
