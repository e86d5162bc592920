// pybind11 bindings of the streaming engine (pinned pool, streamer, disk readers).
#include <pybind11/pybind11.h>

namespace moestream {
void bind_stream(pybind11::module_& m) { (void)m; }
}  // namespace moestream
