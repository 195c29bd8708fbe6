// ShmGroup: the typed binding of shm_group.h, a shared-memory all-reduce between processes.
//
//   ShmGroup.layout_bytes(world, capacity) -> the segment's size in bytes
//   ShmGroup(segment, rank, world, capacity, timeout_s)
//     segment: a writable uint8 array over memory every rank has mapped (e.g. numpy over an
//     mmap of one file), at least layout_bytes bytes, 64-byte aligned, zeroed before first use;
//     1 <= world <= 64, 0 <= rank < world, capacity >= 16 floats per round; keeps segment alive.
//   .allreduce(x)   x float32 C-contiguous writable, any size: x <- the sum over the ranks (in
//                   rank order, bit-identical on every rank); RuntimeError on abort or timeout.
//                   GIL released.
//   .abort()        every rank's waits fail (any thread may call it)
//   properties rank, world, capacity, rounds, wait_s (seconds spent waiting), aborted
#include "binding.h"
#include "shm_group.h"

namespace pf_cpu {

PyShmGroup::PyShmGroup(py::object segment, int64_t rank, int64_t world, int64_t capacity, double timeout_s) {
    const Checker ck("ShmGroup");
    ck.in_range("world", world, 1, ShmGroup::kMaxWorld);
    ck.in_range("rank", rank, 0, world - 1, "world - 1");
    ck.in_range("capacity", capacity, 16, int64_t(1) << 30);
    PF_CHECK(ck, timeout_s > 0.0, "timeout_s is ", timeout_s, ", expected a positive number of seconds");
    seg_ = ck.array("segment", segment, Dtype::U8);
    ck.c_contiguous("segment", seg_);
    ck.writable("segment", seg_);
    const int64_t need = ShmGroup::layout_bytes(static_cast<int>(world), capacity);
    PF_CHECK(ck, seg_.nbytes() >= need, "segment has ", seg_.nbytes(), " bytes, expected at least ", need,
             " (layout_bytes(world, capacity))");
    PF_CHECK(ck, reinterpret_cast<uintptr_t>(seg_.data()) % 64 == 0, "segment is not 64-byte aligned");
    group_ = std::make_unique<ShmGroup>(data_of<uint8_t>(seg_), static_cast<int>(rank), static_cast<int>(world),
                                        capacity, timeout_s);
}

void PyShmGroup::allreduce(py::object x) {
    const Checker ck("ShmGroup.allreduce");
    py::array a = ck.array("x", x, Dtype::F32);
    ck.c_contiguous("x", a);
    ck.writable("x", a);
    ck.disjoint("x", a, "segment", seg_);
    py::gil_scoped_release nogil;
    group_->allreduce(data_of<float>(a), static_cast<int64_t>(a.size()));
}

void bind_group(py::module_& m) {
    py::class_<PyShmGroup>(m, "ShmGroup",
        "A shared-memory all-reduce between the processes of one machine: see csrc/cpu/binding_group.cpp")
        .def(py::init<py::object, int64_t, int64_t, int64_t, double>(), py::arg("segment"), py::arg("rank"),
             py::arg("world"), py::arg("capacity"), py::arg("timeout_s"))
        .def_static("layout_bytes", [](int64_t world, int64_t capacity) {
            const Checker ck("ShmGroup.layout_bytes");
            ck.in_range("world", world, 1, ShmGroup::kMaxWorld);
            ck.in_range("capacity", capacity, 16, int64_t(1) << 30);
            return ShmGroup::layout_bytes(static_cast<int>(world), capacity);
        }, py::arg("world"), py::arg("capacity"))
        .def("allreduce", &PyShmGroup::allreduce, py::arg("x"),
             "x <- the sum of every rank's x (rank order); RuntimeError on abort or timeout; GIL released")
        .def("abort", [](const PyShmGroup& g) { g.core().abort(); }, "Make every rank's waits fail")
        .def_property_readonly("aborted", [](const PyShmGroup& g) { return g.core().aborted(); })
        .def_property_readonly("rank", [](const PyShmGroup& g) { return g.core().rank(); })
        .def_property_readonly("world", [](const PyShmGroup& g) { return g.core().world(); })
        .def_property_readonly("capacity", [](const PyShmGroup& g) { return g.core().capacity(); })
        .def_property_readonly("rounds", [](const PyShmGroup& g) { return g.core().rounds(); })
        .def_property_readonly("wait_s", [](const PyShmGroup& g) { return g.core().wait_s(); },
                               "Seconds this rank's rounds spent waiting for the others (diagnostics)")
        .def("__repr__", [](const PyShmGroup& g) {
            return cat("ShmGroup(rank=", g.core().rank(), ", world=", g.core().world(), ", capacity=",
                       g.core().capacity(), ")");
        });
}

}  // namespace pf_cpu
