// Grouped matmul on CUDA: the launch side. Chooses the kernel family for each call and hands it to
// the family's launcher; the host interface is grouped_mm_cuda.h. Kernel families, by file:
//   gmm_schedule.cu(h) : one 1024-thread CTA turns offsets (device memory) into per-group row bounds
//                        and M-tile prefix sums, so the forward kernels map a linear tile id to
//                        (group, m-tile, n-tile) without the host ever reading offsets (no sync).
//   gmm_sm80_mma.cu(h) : bf16/fp16 tensor-core GEMM, sm_80 instructions (cp.async multi-stage
//                        pipeline, ldmatrix from XOR-swizzled shared memory, mma.sync.m16n8k16, fp32
//                        accumulation), persistent CTAs walking the tile list; 16-byte stores through
//                        shared memory. Needs K, N and the leading dimensions to be multiples of 8
//                        elements and 16-byte aligned pointers.
//   gmm_sm90_wgmma.cu(h): forward only, sm_90a: 128x256x64 tiles, two warpgroups issuing
//                        asynchronous wgmma.mma_async from 128B-swizzled shared memory fed by
//                        cp.async. Compiled only with MOESTREAM_GMM_WGMMA and chosen only when the
//                        tuning key gmm_impl="wgmma" asks (auto keeps mma.sync until the wgmma kernel
//                        has been validated on hardware).
//   gmm_simt.cu(h)     : shared-memory tiled FMA GEMM with register blocking for every dtype and
//                        shape. float32 is true float32 (FFMA, no TF32); float64 accumulates in float64.
//   gmm_gemv.cu        : decode path for groups of a few rows: each CTA streams a slice of one
//                        expert's weights with 16-byte loads and multiplies the group's rows (up to R
//                        at a time), so the time is the weight read.
//   gmm_wgrad.cu       : weight / bias gradients: one CTA per output tile (or column block) reducing
//                        the group's rows in order, deterministic; tensor cores for bf16/fp16 when
//                        aligned.
// gmm_common.cuh holds the element helpers and kernel parameters, gmm_launch.cuh the launch
// machinery and the families' entry points.
#include "grouped_mm/grouped_mm_cuda.h"

#include "grouped_mm/gmm_launch.cuh"

namespace moestream {
namespace gmm {
namespace {

// Average rows per group up to which the decode GEMV runs (auto mode). Each item multiplies up to
// R = 8 rows by one read of the weights; groups above R rows re-read the weight slice (from L2).
constexpr int64_t kGemvMaxAvgRows = 8;
// Average rows per group below which the 64-row tensor-core tile is used.
constexpr int64_t kSmallTileMaxAvgRows = 96;

enum class FwdKernel { kSimt, kMmaLarge, kMmaSmall, kGemv, kWgmma };

// Whether the wgmma kernel can run: compiled in, and the device and binary support it.
bool wgmma_usable(const Device& dev) {
#if MOESTREAM_GMM_WGMMA
  return detail::wgmma_available(dev);
#else
  (void)dev;
  return false;
#endif
}

struct FwdChoice {
  Impl impl;
  FwdKernel kernel;
};

FwdChoice choose_forward(const ForwardArgs& p, Impl requested, const Device& dev) {
  const bool half = p.dtype == FloatKind::kBFloat16 || p.dtype == FloatKind::kFloat16;
  const int vec = 16 / detail::elem_size(p.dtype);
  const bool vec_ok = p.K % vec == 0 && p.N % vec == 0 && p.lda % vec == 0 && p.ldo % vec == 0 &&
                      detail::is_aligned16(p.a) && detail::is_aligned16(p.b) && detail::is_aligned16(p.out);
  const bool sm80 = dev.cc_major >= 8;
  const bool mma_ok = half && vec_ok && sm80;
  const bool gemv_ok = p.dtype != FloatKind::kFloat64 && vec_ok && sm80 &&
                       detail::tiles_fit(p.M, p.E, detail::gemv_rows(p.M, p.E), detail::ceil_div(p.N, 4 * vec));
  const int64_t E1 = p.E > 0 ? p.E : 1;
  const FwdKernel mma_kernel =
      detail::ceil_div(p.M, E1) <= kSmallTileMaxAvgRows ? FwdKernel::kMmaSmall : FwdKernel::kMmaLarge;
  switch (requested) {
    case Impl::kSimt:
      return {Impl::kSimt, FwdKernel::kSimt};
    case Impl::kGemv:
      return gemv_ok ? FwdChoice{Impl::kGemv, FwdKernel::kGemv} : FwdChoice{Impl::kSimt, FwdKernel::kSimt};
    case Impl::kMma:
      return mma_ok ? FwdChoice{Impl::kMma, mma_kernel} : FwdChoice{Impl::kSimt, FwdKernel::kSimt};
    case Impl::kWgmma:
      if (mma_ok && wgmma_usable(dev)) return {Impl::kWgmma, FwdKernel::kWgmma};
      return mma_ok ? FwdChoice{Impl::kMma, mma_kernel} : FwdChoice{Impl::kSimt, FwdKernel::kSimt};
    case Impl::kAuto:
    default:
      if (gemv_ok && p.M <= kGemvMaxAvgRows * E1) return {Impl::kGemv, FwdKernel::kGemv};
      if (mma_ok) return {Impl::kMma, mma_kernel};
      return {Impl::kSimt, FwdKernel::kSimt};
  }
}

}  // namespace

// ================================================================================================
// public entry points

int64_t forward_workspace_ints(int64_t E) { return 2 * (E + 2); }

bool forward_shape_supported(int64_t M, int64_t N, int64_t K, int64_t E) {
  // 2^30 keeps the schedule's and the loaders' int32 arithmetic exact; 64 x 64 is the smallest tile
  // of the GEMM kernels (the GEMV's own bound is checked when it is chosen).
  constexpr int64_t kLim = int64_t(1) << 30;
  return M < kLim && N < kLim && K < kLim && E < kLim && detail::tiles_fit(M, E, 64, detail::ceil_div(N, 64));
}

Impl forward_impl(const ForwardArgs& p, Impl requested, const Device& dev) {
  return choose_forward(p, requested, dev).impl;
}

cudaError_t grouped_mm_forward(const ForwardArgs& p, Impl requested, const Device& dev, int* workspace,
                               cudaStream_t stream) {
  if (p.M <= 0 || p.N <= 0) return cudaSuccess;
  if (!forward_shape_supported(p.M, p.N, p.K, p.E)) return cudaErrorInvalidValue;
  switch (choose_forward(p, requested, dev).kernel) {
    case FwdKernel::kMmaLarge:
      return detail::mma_forward(p, /*small_tile=*/false, dev, workspace, stream);
    case FwdKernel::kMmaSmall:
      return detail::mma_forward(p, /*small_tile=*/true, dev, workspace, stream);
    case FwdKernel::kGemv:
      return detail::gemv_forward(p, dev, workspace, stream);
    case FwdKernel::kWgmma:
#if MOESTREAM_GMM_WGMMA
      return detail::wgmma_forward(p, dev, workspace, stream);
#else
      return cudaErrorNotSupported;  // never chosen: wgmma_usable() is false
#endif
    case FwdKernel::kSimt:
      break;
  }
  return detail::simt_forward(p, dev, workspace, stream);
}

Impl weight_grad_impl(const WeightGradArgs& p, Impl requested, const Device& dev) {
  const bool half = p.dtype == FloatKind::kBFloat16 || p.dtype == FloatKind::kFloat16;
  const bool aligned = p.K % 8 == 0 && p.N % 8 == 0 && p.lda % 8 == 0 && p.ldd % 8 == 0 &&
                       detail::is_aligned16(p.a) && detail::is_aligned16(p.dy) && detail::is_aligned16(p.out);
  const bool mma_ok = half && aligned && dev.cc_major >= 8;
  if (requested == Impl::kSimt || requested == Impl::kGemv) return Impl::kSimt;
  return mma_ok ? Impl::kMma : Impl::kSimt;
}

cudaError_t grouped_mm_weight_grad(const WeightGradArgs& p, Impl requested, const Device& dev,
                                   cudaStream_t stream) {
  if (p.E <= 0 || p.K <= 0 || p.N <= 0) return cudaSuccess;
  return detail::weight_grad(p, weight_grad_impl(p, requested, dev), stream);
}

cudaError_t grouped_bias_grad(const BiasGradArgs& p, cudaStream_t stream) { return detail::bias_grad(p, stream); }

}  // namespace gmm
}  // namespace moestream
