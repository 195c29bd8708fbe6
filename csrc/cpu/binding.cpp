// The _pf_cpu module: the typed API (binding_linear.cpp, binding_attention.cpp,
// binding_block.cpp) on the thread pool of pool.h.
//
//   MAX_ROWS = 16, MAX_LINEAR_ROWS = 4096, PRO_NONE, PRO_RMSNORM, PRO_SILU_MUL = 0, 1, 2
//   FMT_F32 ... FMT_BF16 = 0 ... 5; row_bytes, dequantize, isa, isas, set_isa (binding_quant.cpp)
//   LinearPlan, BlockPlan, decode_attention (typed overload), set_spin_us(us), spin_us(),
//   ShmGroup (binding_group.cpp), pool_workers(); _set_chunking(bytes), _chunking() (benchmark tuning)
#include <chrono>

#include "binding.h"
#include "pool.h"

namespace py = pybind11;
using namespace pf_cpu;

PYBIND11_MODULE(_pf_cpu, m) {
    m.doc() = "csrc/cpu: fused grouped-LoRA linear, decode attention and a decoder block's decode "
              "step for CPU decode steps (AVX2/FMA), on its own thread pool";
    m.attr("MAX_ROWS") = MAX_ROWS;
    m.attr("MAX_LINEAR_ROWS") = MAX_LINEAR_ROWS;
    m.attr("PRO_NONE") = static_cast<int>(PRO_NONE);
    m.attr("PRO_RMSNORM") = static_cast<int>(PRO_RMSNORM);
    m.attr("PRO_SILU_MUL") = static_cast<int>(PRO_SILU_MUL);
    bind_linear(m);
    bind_attention(m);
    bind_block(m);
    bind_quant(m);
    bind_group(m);
    m.def("set_spin_us", [](int64_t us) {
        Checker("set_spin_us").in_range("us", us, 0, 1000000);
        set_spin_us(us);
    }, py::arg("us"), "How long a waiting pool thread spins before it sleeps (microseconds)");
    m.def("spin_us", &spin_us);
    m.def("pool_workers", &pool_workers, "Worker threads the pool has started (the caller is not one)");
    m.def("_contention", [] {
        return py::dict(py::arg("signs") = contended_signs(), py::arg("windows") = contended_windows());
    }, "Signs of a shared machine the pool has seen (a late worker, a long wait) and the windows "
       "in which jobs ran inline because of them");
    m.def("_set_contention_detection", &set_contention_detection, py::arg("on"),
          "Off: jobs use the pool even on a machine that looks shared (tests)");
    m.def("_set_chunking", [](int64_t bytes) {
        const Checker ck("_set_chunking");
        ck.in_range("bytes", bytes, 1, int64_t(1) << 30);
        set_chunking({bytes});
    }, py::arg("bytes"), "LinearPlan's chunk size in bytes of weight rows (tuning)");
    m.def("_pool_probe", [](int64_t n, double chunk_us, int threads, int iters) {
        // Mean microseconds per parallel_for of n chunks that each spin chunk_us: the pool's
        // own cost is that minus n * chunk_us / threads (benchmarks, tuning).
        py::gil_scoped_release nogil;
        const auto spin = [chunk_us](int64_t) {
            const auto t0 = std::chrono::steady_clock::now();
            while (std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() < chunk_us) {}
        };
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) parallel_for(n, threads, spin);
        return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / iters;
    }, py::arg("n"), py::arg("chunk_us"), py::arg("threads"), py::arg("iters"));
    m.def("_chunking", [] {
        const Chunking c = chunking();
        return py::dict(py::arg("bytes") = c.bytes);
    });
}
