// pybind11 bindings of the streaming engine: moestream._C.PinMode, HostPool, StreamerConfig, Segment
// and Streamer. The Python side (planner, materialiser, hooks) lives in moestream.offload.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include <vector>

#include "stream/engine.h"

namespace py = pybind11;

namespace moestream {

void bind_stream(py::module_& m) {
  using namespace moestream::stream;
  m.def("stream_live_bytes", [] { return py::make_tuple(live_host_bytes(), live_slot_bytes()); },
        "(host pool bytes, slot bytes) currently allocated by streaming engines in this process");
  m.def("stream_staging_bytes", &Streamer::staging_bytes, py::arg("chunk_bytes"), py::arg("num_staging"),
        "host bytes a Streamer allocates for num_staging staging buffers of chunk_bytes chunks");

  py::enum_<PinMode>(m, "PinMode", "How a HostPool is page-locked")
      .value("none", PinMode::kNone)
      .value("mlock", PinMode::kMlock)
      .value("cuda", PinMode::kCuda);

  py::enum_<Eviction>(m, "Eviction", "Which loaded unit a Streamer evicts when no slot is free")
      .value("lru", Eviction::kLRU)
      .value("lfu", Eviction::kLFU);

  py::class_<HostPool, std::shared_ptr<HostPool>>(m, "HostPool", "One aligned host allocation")
      .def(py::init([](int64_t nbytes, PinMode pin) { return std::make_shared<HostPool>(nbytes, pin); }),
           py::arg("nbytes"), py::arg("pin") = PinMode::kNone, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("capacity", &HostPool::capacity)
      .def_property_readonly("pinned", &HostPool::pinned)
      .def_property_readonly("pin_mode", &HostPool::pin_mode)
      .def_property_readonly("pin_error", &HostPool::pin_error)
      .def("pin", &HostPool::pin, py::call_guard<py::gil_scoped_release>(),
           "page-locks the pool (cudaHostRegister or mlock per its pin mode); returns whether it is pinned")
      .def("populate", &HostPool::populate, py::arg("offset"), py::arg("nbytes"),
           py::call_guard<py::gil_scoped_release>())
      .def("view", &HostPool::view, py::arg("offset"), py::arg("nbytes"));

  py::class_<StreamerConfig>(m, "StreamerConfig", "Everything that shapes a Streamer, fixed at construction")
      .def(py::init([](const std::string& device, int64_t slot_bytes, int num_slots, int num_readers,
                       int64_t chunk_bytes, int num_staging, bool direct_io, PinMode staging_pin,
                       bool contiguous_slots, Eviction eviction) {
             StreamerConfig c;
             c.device = device;
             c.slot_bytes = slot_bytes;
             c.num_slots = num_slots;
             c.num_readers = num_readers;
             c.chunk_bytes = chunk_bytes;
             c.num_staging = num_staging;
             c.direct_io = direct_io;
             c.staging_pin = staging_pin;
             c.contiguous_slots = contiguous_slots;
             c.eviction = eviction;
             return c;
           }),
           py::kw_only(), py::arg("device") = "cpu", py::arg("slot_bytes"), py::arg("num_slots") = 1,
           py::arg("num_readers") = 4, py::arg("chunk_bytes") = int64_t{4} << 20, py::arg("num_staging") = 0,
           py::arg("direct_io") = false, py::arg("staging_pin") = PinMode::kNone,
           py::arg("contiguous_slots") = false, py::arg("eviction") = Eviction::kLRU)
      .def_readonly("device", &StreamerConfig::device)
      .def_readonly("slot_bytes", &StreamerConfig::slot_bytes)
      .def_readonly("num_slots", &StreamerConfig::num_slots)
      .def_readonly("num_readers", &StreamerConfig::num_readers)
      .def_readonly("chunk_bytes", &StreamerConfig::chunk_bytes)
      .def_readonly("num_staging", &StreamerConfig::num_staging)
      .def_readonly("direct_io", &StreamerConfig::direct_io)
      .def_readonly("staging_pin", &StreamerConfig::staging_pin)
      .def_readonly("contiguous_slots", &StreamerConfig::contiguous_slots)
      .def_readonly("eviction", &StreamerConfig::eviction);

  py::class_<Segment>(m, "Segment", "Bytes to place at dst_offset of a slot: from file `file` or the pool (-1)")
      .def(py::init([](int64_t dst_offset, int64_t nbytes, int file, int64_t src_offset, const std::string& name) {
             Segment s;
             s.dst_offset = dst_offset;
             s.nbytes = nbytes;
             s.file = file;
             s.src_offset = src_offset;
             s.name = name;
             return s;
           }),
           py::arg("dst_offset"), py::arg("nbytes"), py::arg("file"), py::arg("src_offset"), py::arg("name") = "")
      .def_readonly_static("FROM_POOL", &Segment::kFromPool)
      .def_readonly("dst_offset", &Segment::dst_offset)
      .def_readonly("nbytes", &Segment::nbytes)
      .def_readonly("file", &Segment::file)
      .def_readonly("src_offset", &Segment::src_offset)
      .def_readonly("name", &Segment::name)
      .def("__repr__", [](const Segment& s) {
        return "Segment(dst_offset=" + std::to_string(s.dst_offset) + ", nbytes=" + std::to_string(s.nbytes) +
               ", file=" + std::to_string(s.file) + ", src_offset=" + std::to_string(s.src_offset) + ", name='" +
               s.name + "')";
      });

  py::class_<Streamer, std::shared_ptr<Streamer>>(m, "Streamer", "Streams units into a ring of device slots")
      .def(py::init<std::shared_ptr<HostPool>, const StreamerConfig&>(), py::arg("pool"), py::arg("config"),
           py::call_guard<py::gil_scoped_release>())
      .def("add_file", &Streamer::add_file, py::arg("path"))
      .def("add_unit", &Streamer::add_unit, py::arg("segments"))
      .def("prefetch", &Streamer::prefetch, py::arg("unit"), py::call_guard<py::gil_scoped_release>())
      .def("acquire", &Streamer::acquire, py::arg("unit"), py::arg("ahead") = std::vector<int>{},
           py::call_guard<py::gil_scoped_release>())
      .def("release", &Streamer::release, py::arg("unit"), py::call_guard<py::gil_scoped_release>())
      .def("request", &Streamer::request, py::arg("unit"), py::call_guard<py::gil_scoped_release>())
      .def("wait", &Streamer::wait, py::arg("unit"), py::call_guard<py::gil_scoped_release>())
      .def("is_cached", &Streamer::is_cached, py::arg("unit"))
      .def("is_ready", &Streamer::is_ready, py::arg("unit"))
      .def("slot_units", &Streamer::slot_units)
      .def("slot_array", &Streamer::slot_array)
      .def("synchronize", &Streamer::synchronize, py::call_guard<py::gil_scoped_release>())
      .def(
          "read_into",
          [](Streamer& s, const at::Tensor& dst, std::vector<Segment> segs) {
            py::gil_scoped_release nogil;
            s.read_into(dst, std::move(segs));
          },
          py::arg("dst"), py::arg("segments"))
      .def("stats", &Streamer::stats)
      .def("reset_stats", &Streamer::reset_stats)
      .def("slot", &Streamer::slot, py::arg("index"))
      .def_property_readonly("config", &Streamer::config)
      .def_property_readonly("staging_pinned", &Streamer::staging_pinned)
      .def_property_readonly("staging_pin_error", &Streamer::staging_pin_error)
      .def_property_readonly("num_slots", &Streamer::num_slots)
      .def_property_readonly("slot_bytes", &Streamer::slot_bytes)
      .def_property_readonly("num_units", &Streamer::num_units)
      .def_property_readonly("device", &Streamer::device_str);
}

}  // namespace moestream
