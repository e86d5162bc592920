// Host-side helpers shared by the CPU kernels: large outputs backed by transparent huge pages, and
// the choice between ATen's native low-precision GEMM and a float32 detour.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "common/cpu_isa.h"
#include "common/tuning.h"

namespace moestream {
namespace cpu {

// Large fresh allocations come from mmap: every 4 KiB page faults on its first write. On the
// 2-core development VM, torch.empty(128 MiB).fill_() took 34 ms, 30 of them in page faults;
// with the range advised for transparent huge pages it took 10 ms (16 MiB: 4.2 ms -> 0.3 ms).
// Advising is a hint on untouched memory: no extra memory, no effect on the values.
// The tuning key cpu_hugepages=False turns it off (common/tuning.h).
constexpr int64_t kHugePageAdviseBytes = int64_t(4) << 20;

inline void advise_hugepages(void* data, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (data == nullptr || nbytes < kHugePageAdviseBytes || !tuning().cpu_hugepages) return;
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t p = reinterpret_cast<uintptr_t>(data);
  const uintptr_t lo = (p + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = (p + static_cast<uintptr_t>(nbytes)) & ~(kHuge - 1);
  if (hi > lo) (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // a hint: errors ignored
#else
  (void)data;
  (void)nbytes;
#endif
}

// Bytes of physical memory of this machine (0 when unknown). Scratch sized by an argument rather
// than by the tensors (permute's per-expert counts) is checked against it: with overcommit a larger
// allocation succeeds and the process is killed when the pages are touched.
inline int64_t physical_memory_bytes() {
#if defined(__linux__)
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  if (pages > 0 && page > 0) return static_cast<int64_t>(pages) * static_cast<int64_t>(page);
#endif
  return 0;
}

// at::empty for outputs and scratch that the kernel writes in full right away.
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (t.device().is_cpu()) advise_hugepages(t.data_ptr(), static_cast<int64_t>(t.nbytes()));
  return t;
}

// How bfloat16 / float16 GEMMs are run.
//  - native: at::mm on the low-precision tensors. Fast only where ATen routes them to oneDNN
//    (x86 with AVX-512 BW/VL/DQ for bfloat16, AVX-512-FP16 for float16), the same test ATen uses.
//    On a 2-core AMD EPYC with AVX-512-BF16, one thread ran [128,1024]x[1024,1024] at ~210 GFLOP/s
//    natively against ~97 GFLOP/s for SGEMM.
//  - float: convert the operands to float32, run SGEMM, round the float32 result once. On an
//    AVX2-only AMD EPYC (2 threads) ATen's bf16 fallback GEMM ran [4096,1024]x[1024,1024] at
//    ~1 GFLOP/s (12.7 s) against ~130 GFLOP/s for SGEMM.
// The tuning key cpu_lowp_gemm="native" | "float" overrides the choice (common/tuning.h).
inline bool lowp_native(at::ScalarType t) {
  const LowpGemm forced = tuning().cpu_lowp_gemm;
  if (forced != LowpGemm::kAuto) return forced == LowpGemm::kNative;
  // not measured off x86: there the has_*() tests are false and the predictable float32 path runs
  if (!at::globalContext().userEnabledMkldnn()) return false;
  return t == at::kBFloat16 ? has_avx512_bw_vl_dq() : (t == at::kHalf ? has_avx512_fp16() : true);
}

inline bool is_lowp(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

}  // namespace cpu
}  // namespace moestream
