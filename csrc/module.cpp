// The Python extension module moestream._C. Importing it registers every torch.ops.moestream.*
// operator (static registrars in the kernel files), exposes the kernel tuning (get_tuning /
// set_tuning, common/tuning.cpp), the streaming engine classes and the disk read probe of the
// benchmarks.
#include <pybind11/pybind11.h>

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
}
