// pybind11 bindings of the streaming engine (pinned pool, streamer, disk readers), as
// moestream._C.HostPool / Streamer / read_files_seconds. The Python side lives in moestream.offload.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include <tuple>
#include <vector>

#include "stream/engine.h"

namespace py = pybind11;

namespace moestream {
namespace stream {
namespace {

// (dst_offset, nbytes, file, src_offset, name): file -1 means "from the host pool".
using SegmentTuple = std::tuple<int64_t, int64_t, int, int64_t, std::string>;

std::vector<Segment> to_segments(const std::vector<SegmentTuple>& in) {
  std::vector<Segment> out;
  out.reserve(in.size());
  for (const auto& t : in) {
    Segment s;
    s.dst_offset = std::get<0>(t);
    s.nbytes = std::get<1>(t);
    s.file = std::get<2>(t);
    s.src_offset = std::get<3>(t);
    s.name = std::get<4>(t);
    out.push_back(std::move(s));
  }
  return out;
}

}  // namespace
}  // namespace stream

void bind_stream(py::module_& m) {
  using namespace moestream::stream;
  m.def("stream_live_bytes", [] { return py::make_tuple(live_host_bytes(), live_slot_bytes()); },
        "(host pool bytes, slot bytes) currently allocated by streaming engines in this process");
  m.def("stream_staging_bytes", &Streamer::staging_bytes, py::arg("chunk_bytes"), py::arg("num_staging"),
        "pool bytes needed by num_staging staging buffers of chunk_bytes chunks");
  m.def("read_files_seconds", &read_files_seconds, py::arg("paths"), py::arg("chunk_bytes"), py::arg("threads"),
        py::arg("direct_io") = false, py::call_guard<py::gil_scoped_release>(),
        "reads the files whole with `threads` threads and returns the seconds taken (raw read rate probe)");

  py::class_<HostPool, std::shared_ptr<HostPool>>(m, "HostPool",
                                                 "One aligned host allocation; pin: 0 none, 1 mlock, 2 CUDA")
      .def(py::init([](int64_t nbytes, int pin) {
             TORCH_CHECK(pin >= 0 && pin <= 2, "moestream.HostPool: pin must be 0 (none), 1 (mlock) or 2 (cuda), got ",
                         pin);
             return std::make_shared<HostPool>(nbytes, static_cast<PinMode>(pin));
           }),
           py::arg("nbytes"), py::arg("pin") = 0, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("capacity", &HostPool::capacity)
      .def_property_readonly("pinned", &HostPool::pinned)
      .def_property_readonly("pin_error", &HostPool::pin_error)
      .def("pin", &HostPool::pin, py::call_guard<py::gil_scoped_release>(),
           "page-locks the pool (cudaHostRegister or mlock per its pin mode); returns whether it is pinned")
      .def("populate", &HostPool::populate, py::arg("offset"), py::arg("nbytes"),
           py::call_guard<py::gil_scoped_release>())
      .def("view", &HostPool::view, py::arg("offset"), py::arg("nbytes"));

  py::class_<Streamer, std::shared_ptr<Streamer>>(m, "Streamer", "Streams units into a ring of device slots")
      .def(py::init<std::shared_ptr<HostPool>, const std::string&, int64_t, int, int, int64_t, int64_t, int, bool>(),
           py::arg("pool"), py::arg("device"), py::arg("slot_bytes"), py::arg("num_slots"), py::arg("num_readers"),
           py::arg("chunk_bytes"), py::arg("staging_offset") = 0, py::arg("num_staging") = 0,
           py::arg("direct_io") = false)
      .def("add_file", &Streamer::add_file, py::arg("path"))
      .def(
          "add_unit",
          [](Streamer& s, const std::vector<SegmentTuple>& segs) { return s.add_unit(to_segments(segs)); },
          py::arg("segments"))
      .def("prefetch", &Streamer::prefetch, py::arg("unit"), py::call_guard<py::gil_scoped_release>())
      .def("acquire", &Streamer::acquire, py::arg("unit"), py::arg("ahead") = std::vector<int>{},
           py::call_guard<py::gil_scoped_release>())
      .def("release", &Streamer::release, py::arg("unit"), py::call_guard<py::gil_scoped_release>())
      .def("synchronize", &Streamer::synchronize, py::call_guard<py::gil_scoped_release>())
      .def(
          "read_into",
          [](Streamer& s, const at::Tensor& dst, const std::vector<SegmentTuple>& segs) {
            auto v = to_segments(segs);
            py::gil_scoped_release nogil;
            s.read_into(dst, std::move(v));
          },
          py::arg("dst"), py::arg("segments"))
      .def("stats", &Streamer::stats)
      .def("reset_stats", &Streamer::reset_stats)
      .def("slot", &Streamer::slot, py::arg("index"))
      .def_property_readonly("num_slots", &Streamer::num_slots)
      .def_property_readonly("slot_bytes", &Streamer::slot_bytes)
      .def_property_readonly("num_units", &Streamer::num_units)
      .def_property_readonly("device", &Streamer::device_str);
}

}  // namespace moestream
