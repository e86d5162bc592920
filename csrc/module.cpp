// The Python extension module moestream._C. Importing it registers every torch.ops.moestream.*
// operator (static registrars in the kernel files), exposes the kernel tuning (get_tuning /
// set_tuning, common/tuning.cpp), the streaming engine classes, the disk read probe of the
// benchmarks and whether the CPU has the int8-activation kernels of the compressed matmuls.
#include <pybind11/pybind11.h>

#include "quant/quant_cpu.h"

namespace moestream {
void bind_stream(pybind11::module_& m);
void bind_disk_probe(pybind11::module_& m);
void bind_tuning(pybind11::module_& m);
}  // namespace moestream

PYBIND11_MODULE(_C, m) {
  m.doc() = "moestream native extension";
#ifdef MOESTREAM_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  moestream::bind_tuning(m);
  moestream::bind_stream(m);
  moestream::bind_disk_probe(m);
  m.def("quant_int8_activations", &moestream::quant::a8::available,
        "whether the CPU runs the compressed matmuls' int8-activation (AVX-512 VNNI) kernels");
}
