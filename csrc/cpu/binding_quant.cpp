// The weight formats' helpers (quant_format.h) for Python, and the instruction set (isa.h):
//
//   FMT_F32, FMT_Q8_0, FMT_Q4_0, FMT_Q4_1, FMT_F16, FMT_BF16, FMT_Q5_0, FMT_Q4_K, FMT_Q5_K, FMT_Q6_K
//   = 0 ... 9;  row_bytes(fmt, d_in)
//   dequantize(weight, fmt, out, rows=None, threads=1)
//     weight uint8 [O, row_bytes(fmt, d_in)] C-contiguous, stored rows (quant.h, half.h); out float32
//     [n, d_in] C-contiguous, written: out[i] = W[rows[i]] (rows int64 [n], each in [0, O)), or
//     out = W (rows None, n = O).  GIL released; rows split over the pool.
//   bf16_tiles() -> whether a bf16 W's prefill takes AMX-BF16 tiles (amx_bf16.h)
//   isa() -> name; isas() -> [(name, needs, supported)], best first; set_isa(name): ValueError
//     (one line) when unknown or unsupported
#include <stdexcept>

#include "binding.h"
#include "half.h"
#include "isa.h"
#include "pool.h"
#include "quant.h"

namespace pf_cpu {
namespace {

void dequantize(py::object weight, int fmt, py::object out, py::object rows, int threads) {
    const Checker ck("dequantize");
    ck.in_range("fmt", fmt, FMT_Q8_0, FMT_LAST, "a format stored as bytes (FMT_Q8_0 ... FMT_Q6_K)");
    check_threads(ck, threads);
    py::array w = ck.array("weight", weight, Dtype::U8);
    ck.ndim("weight", w, 2, "O, blocks * block_bytes");
    ck.c_contiguous("weight", w);
    const int64_t O = w.shape(0), cols = w.shape(1);
    py::array o = ck.array("out", out, Dtype::F32);
    ck.ndim("out", o, 2, "n, d_in");
    const int64_t n = o.shape(0), d_in = o.shape(1), nb = d_in / QK;
    const int64_t mult = row_multiple(fmt);
    PF_CHECK(ck, d_in >= mult && d_in % mult == 0, "out has shape ", shape_str(o), ", expected d_in = out.shape[1] "
             "a multiple of ", mult, " in ", format_name(fmt));
    ck.equal("weight.shape[1]", cols, row_layout(fmt, nb).bytes, "the row bytes of d_in = out.shape[1] in this format");
    ck.c_contiguous("out", o);
    ck.writable("out", o);
    ck.disjoint("weight", w, "out", o);
    std::vector<int64_t> idx;
    if (auto r = ck.optional("rows", rows, Dtype::I64)) {
        ck.shape("rows", *r, {n}, "n = out.shape[0]");
        const auto ra = r->unchecked<int64_t, 1>();
        idx.resize(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) {
            ck.in_range(cat("rows[", i, "]"), ra(i), 0, O - 1, "weight.shape[0] - 1");
            idx[i] = ra(i);
        }
    } else {
        ck.equal("out.shape[0]", n, O, "weight.shape[0] with rows=None");
    }
    const uint8_t* src = data_of<const uint8_t>(w);
    float* dst = data_of<float>(o);
    const int64_t per = std::max<int64_t>(1, (int64_t(1) << 16) / (4 * d_in));   // ~64 KiB out per chunk
    const int64_t chunks = std::min<int64_t>((n + per - 1) / per, kMaxChunks);
    const int64_t step = (n + chunks - 1) / std::max<int64_t>(1, chunks);
    py::gil_scoped_release nogil;
    parallel_for(chunks, threads, [&](int64_t c) {
        for (int64_t i = c * step, e = std::min(n, (c + 1) * step); i < e; ++i) {
            const int64_t r = idx.empty() ? i : idx[i];
            if (is_half(fmt)) half_row(fmt, src + r * cols, d_in, dst + i * d_in);
            else dequantize_row(fmt, src + r * cols, nb, dst + i * d_in);
        }
    });
}

}  // namespace

void bind_quant(py::module_& m) {
    m.attr("FMT_F32") = static_cast<int>(FMT_F32);
    m.attr("FMT_Q8_0") = static_cast<int>(FMT_Q8_0);
    m.attr("FMT_Q4_0") = static_cast<int>(FMT_Q4_0);
    m.attr("FMT_Q4_1") = static_cast<int>(FMT_Q4_1);
    m.attr("FMT_F16") = static_cast<int>(FMT_F16);
    m.attr("FMT_BF16") = static_cast<int>(FMT_BF16);
    m.attr("FMT_Q5_0") = static_cast<int>(FMT_Q5_0);
    m.attr("FMT_Q4_K") = static_cast<int>(FMT_Q4_K);
    m.attr("FMT_Q5_K") = static_cast<int>(FMT_Q5_K);
    m.attr("FMT_Q6_K") = static_cast<int>(FMT_Q6_K);
    m.def("row_bytes", [](int fmt, int64_t d_in) {
        const Checker ck("row_bytes");
        ck.in_range("fmt", fmt, FMT_Q8_0, FMT_LAST, "a format stored as bytes (FMT_Q8_0 ... FMT_Q6_K)");
        const int64_t mult = row_multiple(fmt);
        PF_CHECK(ck, d_in >= mult && d_in % mult == 0, "d_in is ", d_in, ", expected a multiple of ", mult,
                 " in ", format_name(fmt));
        return row_layout(fmt, d_in / QK).bytes;
    }, py::arg("fmt"), py::arg("d_in"), "Bytes of one repacked row of d_in values in fmt (quant.h)");
    m.def("dequantize", &dequantize, py::arg("weight"), py::arg("fmt"), py::arg("out"),
          py::arg("rows") = py::none(), py::arg("threads") = 1,
          "out = weight's rows (all, or rows[i]) as float32; GIL released");
    m.def("isa", [] { return isa(); }, "The instruction set the block-format dots use (isa.h)");
    m.def("bf16_tiles", [] { return hrows_tiles_kernel() != nullptr; },
          "Whether a bf16 W's prefill takes AMX-BF16 tiles here (the amx variant in use on a CPU with AMX-BF16)");
    m.def("isas", [] {
        py::list out;
        for (const IsaInfo& i : isas()) out.append(py::make_tuple(i.name, i.needs, i.supported));
        return out;
    }, "The variants compiled in, best first: (name, CPU features it needs, supported here)");
    m.def("set_isa", [](const std::string& name) {
        try {
            set_isa(name);
        } catch (const std::invalid_argument& e) {
            throw py::value_error(std::string("set_isa: ") + e.what());
        }
    }, py::arg("name"), "Use this variant's block-format dots (its outputs equal the others')");
}

}  // namespace pf_cpu
