// Process-wide kernel tuning: the switches that benchmarks and tests flip to compare the kernel
// variants, and the opt-in input validation of the CUDA ops. Python reads and sets them with
// moestream._C.get_tuning() / set_tuning(**kw) (python/moestream/_tuning.py wraps them in a
// context manager); C++ reads a snapshot with tuning(): a few relaxed atomic loads, nothing next
// to a kernel. The defaults are the measured choices (see the comments where each is used).
// Plain C++ (no torch, no CUDA) so that every kernel file can include it.
#pragma once
#include <cstdint>

namespace moestream {

// How bfloat16 / float16 GEMMs run on the CPU (cpu::lowp_native, common/cpu_memory.h).
enum class LowpGemm : int { kAuto = 0, kNative = 1, kFloat = 2 };
// How the CPU grouped_mm spreads its groups over threads (grouped_mm_cpu.cpp, choose_split).
enum class GmmSchedule : int { kAuto = 0, kSplit = 1, kSerial = 2 };
// The CUDA grouped-matmul kernel family (grouped_mm/grouped_mm_cuda.h, gmm::Impl).
enum class GmmImpl : int { kAuto = 0, kSimt = 1, kMma = 2, kWgmma = 3, kGemv = 4 };

struct KernelTuning {
  // CUDA ops validate index / offset values (one device->host copy and synchronisation per call).
  // Initial value: the environment variable MOESTREAM_CHECK_INPUTS=1, read once at load.
  bool check_inputs = false;
  // Large CPU outputs advised for transparent huge pages (cpu::empty_large).
  bool cpu_hugepages = true;
  LowpGemm cpu_lowp_gemm = LowpGemm::kAuto;
  GmmSchedule cpu_gmm_schedule = GmmSchedule::kAuto;
  // KiB of the float32 panel of b[g] in the CPU grouped_mm's low-precision path (>= 1).
  int64_t cpu_panel_kb = 512;
  // Caps the group rows that take the CPU grouped_mm's small-row kernels (0: never); < 0 keeps the
  // measured limits.
  int64_t cpu_small_rows = -1;
  GmmImpl gmm_impl = GmmImpl::kAuto;
};

// The current values.
KernelTuning tuning();
// Replaces them all; throws std::invalid_argument naming the field when a value is out of range
// (or asks for a kernel this build does not contain).
void set_tuning(const KernelTuning& t);

// Whether the wgmma grouped-matmul kernels are compiled in (CMake option MOESTREAM_GMM_WGMMA).
bool gmm_wgmma_compiled();

}  // namespace moestream
