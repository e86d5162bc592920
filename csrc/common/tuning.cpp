// The process-wide kernel tuning (common/tuning.h) and its Python face, moestream._C.get_tuning()
// and moestream._C.set_tuning(**kw): every key, value name and range check lives here.
#include "common/tuning.h"

#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace moestream {
namespace {

bool env_check_inputs() {
  const char* v = std::getenv("MOESTREAM_CHECK_INPUTS");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

constexpr KernelTuning kDefaults{};

// One relaxed atomic per field: readers on any thread see each field either before or after a
// set_tuning, never torn. Namespace scope, so MOESTREAM_CHECK_INPUTS is read when the library loads.
struct Store {
  std::atomic<bool> check_inputs{env_check_inputs()};
  std::atomic<bool> cpu_hugepages{kDefaults.cpu_hugepages};
  std::atomic<int> cpu_lowp_gemm{static_cast<int>(kDefaults.cpu_lowp_gemm)};
  std::atomic<int> cpu_gmm_schedule{static_cast<int>(kDefaults.cpu_gmm_schedule)};
  std::atomic<int64_t> cpu_panel_kb{kDefaults.cpu_panel_kb};
  std::atomic<int64_t> cpu_small_rows{kDefaults.cpu_small_rows};
  std::atomic<int> gmm_impl{static_cast<int>(kDefaults.gmm_impl)};
};
Store g_store;

constexpr auto kRelaxed = std::memory_order_relaxed;

// Python names of the enum values, in enum order.
constexpr const char* kLowpGemmNames[] = {"auto", "native", "float"};
constexpr const char* kGmmScheduleNames[] = {"auto", "split", "serial"};
constexpr const char* kGmmImplNames[] = {"auto", "simt", "mma", "wgmma", "gemv"};
constexpr const char* kKeys =
    "check_inputs, cpu_hugepages, cpu_lowp_gemm, cpu_gmm_schedule, cpu_panel_kb, cpu_small_rows, gmm_impl";

template <size_t N>
std::string joined(const char* const (&names)[N]) {
  std::string s;
  for (size_t i = 0; i < N; ++i) s += (i ? ", " : "") + std::string(names[i]);
  return s;
}

[[noreturn]] void bad_value(const std::string& key, const std::string& expected, const py::handle& got) {
  throw py::value_error("moestream.set_tuning: " + key + " must be " + expected + ", got " +
                        py::repr(got).cast<std::string>());
}

bool as_bool(const std::string& key, const py::handle& v) {
  if (!py::isinstance<py::bool_>(v)) bad_value(key, "True or False", v);
  return v.cast<bool>();
}

int64_t as_int(const std::string& key, const py::handle& v, int64_t lo, const char* expected) {
  if (!py::isinstance<py::int_>(v) || py::isinstance<py::bool_>(v)) bad_value(key, expected, v);
  const int64_t x = v.cast<int64_t>();
  if (x < lo) bad_value(key, expected, v);
  return x;
}

template <typename E, size_t N>
E as_enum(const std::string& key, const py::handle& v, const char* const (&names)[N]) {
  if (py::isinstance<py::str>(v)) {
    const std::string s = v.cast<std::string>();
    for (size_t i = 0; i < N; ++i)
      if (s == names[i]) return static_cast<E>(i);
  }
  bad_value(key, "one of " + joined(names), v);
}

}  // namespace

KernelTuning tuning() {
  KernelTuning t;
  t.check_inputs = g_store.check_inputs.load(kRelaxed);
  t.cpu_hugepages = g_store.cpu_hugepages.load(kRelaxed);
  t.cpu_lowp_gemm = static_cast<LowpGemm>(g_store.cpu_lowp_gemm.load(kRelaxed));
  t.cpu_gmm_schedule = static_cast<GmmSchedule>(g_store.cpu_gmm_schedule.load(kRelaxed));
  t.cpu_panel_kb = g_store.cpu_panel_kb.load(kRelaxed);
  t.cpu_small_rows = g_store.cpu_small_rows.load(kRelaxed);
  t.gmm_impl = static_cast<GmmImpl>(g_store.gmm_impl.load(kRelaxed));
  return t;
}

bool gmm_wgmma_compiled() {
#if defined(MOESTREAM_WITH_CUDA) && defined(MOESTREAM_GMM_WGMMA) && MOESTREAM_GMM_WGMMA
  return true;
#else
  return false;
#endif
}

void set_tuning(const KernelTuning& t) {
  if (t.cpu_panel_kb < 1)
    throw std::invalid_argument("moestream.set_tuning: cpu_panel_kb must be >= 1, got " +
                                std::to_string(t.cpu_panel_kb));
  if (t.gmm_impl == GmmImpl::kWgmma && !gmm_wgmma_compiled())
    throw std::invalid_argument(
        "moestream.set_tuning: gmm_impl 'wgmma' is not compiled into this build (it needs a CUDA build "
        "configured with MOESTREAM_GMM_WGMMA=ON); the others are auto, simt, mma, gemv");
  g_store.check_inputs.store(t.check_inputs, kRelaxed);
  g_store.cpu_hugepages.store(t.cpu_hugepages, kRelaxed);
  g_store.cpu_lowp_gemm.store(static_cast<int>(t.cpu_lowp_gemm), kRelaxed);
  g_store.cpu_gmm_schedule.store(static_cast<int>(t.cpu_gmm_schedule), kRelaxed);
  g_store.cpu_panel_kb.store(t.cpu_panel_kb, kRelaxed);
  g_store.cpu_small_rows.store(t.cpu_small_rows, kRelaxed);
  g_store.gmm_impl.store(static_cast<int>(t.gmm_impl), kRelaxed);
}

void bind_tuning(py::module_& m) {
  m.attr("with_gmm_wgmma") = gmm_wgmma_compiled();
  m.def(
      "get_tuning",
      [] {
        const KernelTuning t = tuning();
        py::dict d;
        d["check_inputs"] = t.check_inputs;
        d["cpu_hugepages"] = t.cpu_hugepages;
        d["cpu_lowp_gemm"] = kLowpGemmNames[static_cast<int>(t.cpu_lowp_gemm)];
        d["cpu_gmm_schedule"] = kGmmScheduleNames[static_cast<int>(t.cpu_gmm_schedule)];
        d["cpu_panel_kb"] = t.cpu_panel_kb;
        d["cpu_small_rows"] =
            t.cpu_small_rows < 0 ? py::object(py::none()) : py::object(py::int_(t.cpu_small_rows));
        d["gmm_impl"] = kGmmImplNames[static_cast<int>(t.gmm_impl)];
        return d;
      },
      "The process-wide kernel tuning as a dict (keys: check_inputs, cpu_hugepages, cpu_lowp_gemm, "
      "cpu_gmm_schedule, cpu_panel_kb, cpu_small_rows, gmm_impl).");
  m.def(
      "set_tuning",
      [](py::kwargs kw) {
        KernelTuning t = tuning();
        for (const auto& item : kw) {
          const std::string key = item.first.cast<std::string>();
          const py::handle v = item.second;
          if (key == "check_inputs") {
            t.check_inputs = as_bool(key, v);
          } else if (key == "cpu_hugepages") {
            t.cpu_hugepages = as_bool(key, v);
          } else if (key == "cpu_lowp_gemm") {
            t.cpu_lowp_gemm = as_enum<LowpGemm>(key, v, kLowpGemmNames);
          } else if (key == "cpu_gmm_schedule") {
            t.cpu_gmm_schedule = as_enum<GmmSchedule>(key, v, kGmmScheduleNames);
          } else if (key == "cpu_panel_kb") {
            t.cpu_panel_kb = as_int(key, v, 1, "an int >= 1 (KiB)");
          } else if (key == "cpu_small_rows") {
            t.cpu_small_rows = v.is_none() ? -1 : as_int(key, v, 0, "None or an int >= 0");
          } else if (key == "gmm_impl") {
            t.gmm_impl = as_enum<GmmImpl>(key, v, kGmmImplNames);
          } else {
            throw py::value_error("moestream.set_tuning: unknown key '" + key + "'; the keys are " + kKeys);
          }
        }
        set_tuning(t);  // all or nothing: nothing is stored unless every key was valid
      },
      "Sets keys of the process-wide kernel tuning (see get_tuning); raises ValueError naming the key "
      "for an unknown key or a bad value, and then changes nothing.");
}

}  // namespace moestream
