// LinearPlan: the typed binding of linear_plan.h, built once per projection group.
//
//   LinearPlan(weight, d_out, bias=None, parts=(), blocks=(), num_experts=0, fmt=FMT_F32, a_cat=None,
//              d_in=0, expert_fmt=FMT_F32)
//     fmt FMT_F32 with expert_fmt FMT_F32: weight float32 [d_out + R, d_in] C-contiguous = W_aug
//       (W above A_cat); 1 <= d_out <= rows, R = rows - d_out >= 0; a_cat None
//     fmt FMT_F32 with other experts: weight float32 [d_out, d_in], A_cat as a_cat
//     fmt FMT_Q8_0 / FMT_Q4_0 / FMT_Q4_1 / FMT_F16 / FMT_BF16 (quant_format.h): weight uint8
//       [d_out, row_bytes(fmt, d_in)] C-contiguous, W's rows (block formats repacked: RowLayout),
//       d_in given (a multiple of 32); A_cat as a_cat
//     expert_fmt FMT_F32 / FMT_BF16 / FMT_Q8_0: the experts' format (expert.h); other than
//       FMT_F32 it needs d_in a multiple of 32
//     a_cat  A_cat [R, d_in] C-contiguous: float32 (FMT_F32 experts) or uint8
//            [R, row_bytes(expert_fmt, d_in)]; or None (R = 0)
//     bias   float32 [d_out] contiguous, or None
//     parts  (out0, out1, r0, r1, bT): output columns out0:out1, rows r0:r1 of A_cat (0-based in
//            R), bT C-contiguous: B^T float32 [r1 - r0, out1 - out0] (FMT_F32 experts), B^T
//            uint8 [r1 - r0, 2 dp32] (FMT_BF16; dp32 = out1 - out0 rounded up to 32, zero
//            padded), or FMT_Q8_0's panels uint8 [sum over the part's blocks of
//            ceil(dp / 8) (4 + 32 ceil(n / 4))], n a block's rows (expert.h);
//            increasing and non-overlapping in both ranges
//     blocks (part, expert, r0, r1, scale): absolute rows r0:r1 of A_cat inside the part's rows,
//            sorted by part, increasing and non-overlapping within a part; 0 <= expert < num_experts
//   bf16_tiles  (read-write, default True) a bf16 W's calls of HALF_TILE_MIN tokens or more on
//     AMX-BF16 tiles where the CPU has them (amx_bf16.h); False: half.h's dots at any T
//   run(x, y, gates=None, threads=1, prologue=PRO_NONE, norm=None, eps=0.0, residual=None)
//     x [T, d_in] ([T, 2 d_in] with PRO_SILU_MUL) unit last stride, 1 <= T <= MAX_LINEAR_ROWS;
//     y [T, d_out] unit last stride, written; gates [T, num_experts] unit last stride or None;
//     norm [d_in] with PRO_RMSNORM; residual [T, d_out] or None, may be y itself.
// The plan keeps references to weight, a_cat, bias and every bT, so they live as long as it does.
#include <cmath>
#include <limits>

#include "binding.h"
#include "expert.h"
#include "pool.h"

namespace pf_cpu {

void check_threads(const Checker& ck, int threads) {
    ck.in_range("threads", threads, 1, kMaxThreads, "the caller included");
}

namespace {

py::sequence sequence(const Checker& ck, const std::string& name, py::handle obj, const char* of) {
    if (!py::isinstance<py::sequence>(obj) || py::isinstance<py::str>(obj))
        ck.fail_type(cat(name, " is ", std::string(py::str(py::type::handle_of(obj).attr("__name__"))),
                         ", expected a list of ", of));
    return py::reinterpret_borrow<py::sequence>(obj);
}

// Entry i of a list of tuples, as a sequence of exactly n items.
py::sequence entry(const Checker& ck, const std::string& name, py::handle obj, size_t n,
                   const char* fields) {
    py::sequence s = sequence(ck, name, obj, fields);
    if (s.size() != n) ck.fail(cat(name, " has ", s.size(), " items, expected ", n, " (", fields, ")"));
    return s;
}

}  // namespace

// A_cat's rows from a_cat (None: R = 0), in the experts' format, for d_in values a row.
void LinearPlan::load_a(const Checker& ck, py::object a_cat) {
    const bool f32 = lin_.efmt == FMT_F32;
    const int64_t bytes = f32 ? static_cast<int64_t>(sizeof(float)) * lin_.d_in : row_layout(lin_.efmt, lin_.d_in / QK).bytes;
    auto a = ck.optional("a_cat", a_cat, f32 ? Dtype::F32 : Dtype::U8);
    if (!a) return;
    a_cat_ = *a;
    ck.ndim("a_cat", a_cat_, 2, "R, d_in");
    ck.shape("a_cat", a_cat_, {-1, f32 ? lin_.d_in : bytes}, f32 ? "R, d_in" : "R, row_bytes(expert_fmt, d_in)");
    ck.c_contiguous("a_cat", a_cat_);
    lin_.rank = a_cat_.shape(0);
    lin_.a = data_of<const uint8_t>(a_cat_);
    lin_.a_row_bytes = bytes;
}

LinearPlan::LinearPlan(py::object weight, int64_t d_out, py::object bias, py::object parts,
                       py::object blocks, int64_t num_experts, int fmt, py::object a_cat, int64_t d_in_q,
                       int expert_fmt) {
    const Checker ck("LinearPlan");
    ck.in_range("fmt", fmt, FMT_F32, FMT_LAST, "FMT_F32 ... FMT_Q6_K (quant_format.h)");
    PF_CHECK(ck, expert_fmt == FMT_F32 || expert_fmt == FMT_BF16 || expert_fmt == FMT_Q8_0, "expert_fmt is ",
             expert_fmt, ", expected FMT_F32, FMT_BF16 or FMT_Q8_0");
    lin_.fmt = fmt;
    lin_.efmt = expert_fmt;
    if (fmt == FMT_F32 && expert_fmt == FMT_F32) {
        w_aug_ = ck.array("weight", weight, Dtype::F32);
        ck.ndim("weight", w_aug_, 2, "d_out + R, d_in");
        ck.c_contiguous("weight", w_aug_);
        const int64_t rows = w_aug_.shape(0), d_in = w_aug_.shape(1);
        PF_CHECK(ck, d_in >= 1, "weight has shape ", shape_str(w_aug_), ", expected d_in = weight.shape[1] >= 1");
        ck.in_range("d_out", d_out, 1, rows, "weight.shape[0] = d_out + R");
        PF_CHECK(ck, a_cat.is_none(), "a_cat is given with fmt=FMT_F32, expected None (A_cat is the rows of "
                 "weight below d_out)");
        lin_.w = data_of<const float>(w_aug_);
        lin_.d_in = d_in;
        lin_.rank = rows - d_out;
        lin_.row_bytes = static_cast<int64_t>(sizeof(float)) * d_in;
        lin_.a = reinterpret_cast<const uint8_t*>(lin_.w + d_out * d_in);
        lin_.a_row_bytes = lin_.row_bytes;
    } else if (fmt == FMT_F32) {
        w_aug_ = ck.array("weight", weight, Dtype::F32);
        ck.ndim("weight", w_aug_, 2, "d_out, d_in");
        ck.c_contiguous("weight", w_aug_);
        ck.equal("d_out", d_out, w_aug_.shape(0), "weight.shape[0]: experts in another format than fp32 come as a_cat");
        lin_.w = data_of<const float>(w_aug_);
        lin_.d_in = w_aug_.shape(1);
        lin_.row_bytes = static_cast<int64_t>(sizeof(float)) * lin_.d_in;
    } else {
        w_aug_ = ck.array("weight", weight, Dtype::U8);
        ck.ndim("weight", w_aug_, 2, "d_out, row_bytes");
        ck.c_contiguous("weight", w_aug_);
        const int64_t mult = row_multiple(fmt);
        PF_CHECK(ck, d_in_q >= mult && d_in_q % mult == 0, "d_in is ", d_in_q, ", expected a multiple of ", mult,
                 " with a weight in fmt ", format_name(fmt));
        ck.equal("d_out", d_out, w_aug_.shape(0), "weight.shape[0] with a uint8 weight");
        ck.equal("weight.shape[1]", w_aug_.shape(1), row_layout(fmt, d_in_q / QK).bytes,
                 "the row bytes of d_in in this format (pf_kernels.quant)");
        lin_.wq = data_of<const uint8_t>(w_aug_);
        lin_.d_in = d_in_q;
        lin_.row_bytes = w_aug_.shape(1);
    }
    if (!(fmt == FMT_F32 && expert_fmt == FMT_F32)) {
        PF_CHECK(ck, expert_fmt == FMT_F32 || lin_.d_in % QK == 0, "expert_fmt ", format_name(expert_fmt),
                 " needs d_in a multiple of 32, got d_in = ", lin_.d_in);
        load_a(ck, a_cat);
    }
    ck.in_range("num_experts", num_experts, 0, std::numeric_limits<int32_t>::max());
    lin_.d_out = d_out;
    lin_.num_experts = num_experts;
    if (auto b = ck.optional("bias", bias, Dtype::F32)) {
        bias_ = *b;
        ck.shape("bias", bias_, {d_out}, "d_out");
        ck.c_contiguous("bias", bias_);
        lin_.bias = data_of<const float>(bias_);
    }

    const char* part_fields = "out0, out1, r0, r1, bT";
    py::sequence ps = sequence(ck, "parts", parts, "(out0, out1, r0, r1, bT)");
    for (size_t i = 0; i < ps.size(); ++i) {
        const std::string name = cat("parts[", i, "]");
        py::sequence e = entry(ck, name, ps[i], 5, part_fields);
        LoraPart p{ck.index(name + ".out0", e[0]), ck.index(name + ".out1", e[1]),
                   ck.index(name + ".r0", e[2]), ck.index(name + ".r1", e[3]), nullptr, 0};
        PF_CHECK(ck, 0 <= p.out0 && p.out0 < p.out1 && p.out1 <= d_out, name, " has columns ", p.out0,
                 ":", p.out1, ", expected 0 <= out0 < out1 <= d_out = ", d_out);
        PF_CHECK(ck, 0 <= p.r0 && p.r0 < p.r1 && p.r1 <= lin_.rank, name, " has rows ", p.r0, ":", p.r1,
                 ", expected 0 <= r0 < r1 <= R = ", lin_.rank, " (w_aug.shape[0] - d_out)");
        if (i > 0) {
            const LoraPart& q = lin_.parts.back();
            PF_CHECK(ck, p.out0 >= q.out1 && p.r0 >= q.r1, name, " (columns ", p.out0, ":", p.out1,
                     ", rows ", p.r0, ":", p.r1, ") overlaps or precedes parts[", i - 1, "] (columns ",
                     q.out0, ":", q.out1, ", rows ", q.r0, ":", q.r1,
                     "), expected parts in increasing, non-overlapping order of both ranges");
        }
        const int64_t dp = p.out1 - p.out0;
        py::array bT;
        if (expert_fmt == FMT_F32) {
            bT = ck.array(name + ".bT", e[4], Dtype::F32);
            ck.shape(name + ".bT", bT, {p.r1 - p.r0, dp}, "r1 - r0, out1 - out0");
            p.bstride = static_cast<int64_t>(sizeof(float)) * dp;
        } else if (expert_fmt == FMT_BF16) {
            bT = ck.array(name + ".bT", e[4], Dtype::U8);
            ck.shape(name + ".bT", bT, {p.r1 - p.r0, 2 * round_up(dp, QK)}, "r1 - r0, 2 * (out1 - out0 rounded up to 32)");
            p.bstride = 2 * round_up(dp, QK);
        } else {                     // q8 panels: their size is checked once the blocks are known
            bT = ck.array(name + ".bT", e[4], Dtype::U8);
            ck.ndim(name + ".bT", bT, 1, "panel bytes");
        }
        ck.c_contiguous(name + ".bT", bT);
        p.bT = data_of<const uint8_t>(bT);
        bT_.push_back(bT);
        lin_.parts.push_back(p);
    }

    const char* block_fields = "part, expert, r0, r1, scale";
    py::sequence bs = sequence(ck, "blocks", blocks, "(part, expert, r0, r1, scale)");
    int64_t prev_part = -1;
    for (size_t j = 0; j < bs.size(); ++j) {
        const std::string name = cat("blocks[", j, "]");
        py::sequence e = entry(ck, name, bs[j], 5, block_fields);
        const int64_t part = ck.index(name + ".part", e[0]);
        ck.in_range(name + ".part", part, 0, static_cast<int64_t>(lin_.parts.size()) - 1, "len(parts) - 1");
        PF_CHECK(ck, part >= prev_part, name, " is on part ", part, " after a block on part ", prev_part,
                 ", expected blocks sorted by part");
        LoraBlock b{ck.index(name + ".expert", e[1]), ck.index(name + ".r0", e[2]),
                    ck.index(name + ".r1", e[3]), static_cast<float>(ck.number(name + ".scale", e[4]))};
        PF_CHECK(ck, 0 <= b.expert && b.expert < num_experts, name, " has expert ", b.expert,
                 ", expected 0 <= expert < num_experts = ", num_experts);
        LoraPart& p = lin_.parts[part];
        PF_CHECK(ck, p.r0 <= b.r0 && b.r0 < b.r1 && b.r1 <= p.r1, name, " has rows ", b.r0, ":", b.r1,
                 ", expected r0 < r1 inside parts[", part, "]'s rows ", p.r0, ":", p.r1);
        PF_CHECK(ck, std::isfinite(b.scale), name, " has scale ", b.scale, ", expected a finite number");
        if (part == prev_part) {
            const LoraBlock& q = lin_.blocks.back();
            PF_CHECK(ck, b.r0 >= q.r1, name, " has rows ", b.r0, ":", b.r1, " overlapping or before blocks[",
                     j - 1, "]'s ", q.r0, ":", q.r1, ", expected increasing, non-overlapping rows in a part");
        } else {
            p.b0 = static_cast<int64_t>(j);
        }
        p.b1 = static_cast<int64_t>(j) + 1;
        prev_part = part;
        lin_.blocks.push_back(b);
    }
    if (expert_fmt == FMT_Q8_0) load_panels(ck);
}

// q8 experts: each block's panel offset in its part's bT, and bT's size against its blocks'.
void LinearPlan::load_panels(const Checker& ck) {
    for (size_t i = 0; i < lin_.parts.size(); ++i) {
        LoraPart& p = lin_.parts[i];
        const int64_t groups = round_up(p.out1 - p.out0, EXPERT_COL_ALIGN) / EXPERT_COL_ALIGN;
        int64_t bytes = 0;
        for (int64_t j = p.b0; j < p.b1; ++j) {
            LoraBlock& b = lin_.blocks[j];
            b.nq = round_up(b.r1 - b.r0, 4) / 4;
            b.boff = bytes;
            bytes += groups * (4 + 32 * b.nq);
        }
        const std::string name = cat("parts[", i, "].bT");
        PF_CHECK(ck, static_cast<int64_t>(bT_[i].size()) == bytes, name, " has ", bT_[i].size(), " bytes, expected ", bytes,
                 " (q8 panels of its blocks: ceil(dp / 8) * (4 + 32 * ceil(rank / 4)) each)");
    }
}

void LinearPlan::run(py::object x, py::object y, py::object gates, int threads, int prologue,
                     py::object norm, double eps, py::object residual) const {
    const Checker ck("LinearPlan.run");
    const Linear& L = lin_;
    ck.in_range("prologue", prologue, PRO_NONE, PRO_SILU_MUL, "PRO_NONE, PRO_RMSNORM or PRO_SILU_MUL");
    check_threads(ck, threads);
    const bool silu = prologue == PRO_SILU_MUL;
    const char* x_dims = silu ? "T, 2*d_in" : "T, d_in";
    py::array xa = ck.array("x", x, Dtype::F32);
    ck.ndim("x", xa, 2, x_dims);
    const int64_t T = xa.shape(0);
    ck.in_range("T = x.shape[0]", T, 1, MAX_LINEAR_ROWS, "MAX_LINEAR_ROWS");
    ck.shape("x", xa, {T, silu ? 2 * L.d_in : L.d_in}, x_dims);
    ck.unit_last_stride("x", xa);
    py::array ya = ck.array("y", y, Dtype::F32);
    ck.shape("y", ya, {T, L.d_out}, "T, d_out");
    ck.unit_last_stride("y", ya, true);
    ck.writable("y", ya);
    LinearCall c;
    c.x = data_of<const float>(xa);
    c.xs = row_stride(xa);
    c.T = T;
    c.y = data_of<float>(ya);
    c.ys = row_stride(ya);
    c.prologue = prologue;
    ck.disjoint("x", xa, "y", ya);
    ck.disjoint("weight", w_aug_, "y", ya);
    if (!(L.fmt == FMT_F32 && L.efmt == FMT_F32) && L.rank > 0) ck.disjoint("a_cat", a_cat_, "y", ya);
    if (auto g = ck.optional("gates", gates, Dtype::F32)) {
        ck.shape("gates", *g, {T, L.num_experts}, "T, num_experts");
        ck.unit_last_stride("gates", *g);
        ck.disjoint("gates", *g, "y", ya);
        c.gates = data_of<const float>(*g);
        c.gs = row_stride(*g);
    }
    auto n = ck.optional("norm", norm, Dtype::F32);
    PF_CHECK(ck, n || prologue != PRO_RMSNORM, "norm is None, expected a float32 array (d_in,) with PRO_RMSNORM");
    if (n) {
        ck.shape("norm", *n, {L.d_in}, "d_in");
        ck.c_contiguous("norm", *n);
        ck.disjoint("norm", *n, "y", ya);
        c.norm = data_of<const float>(*n);
    }
    PF_CHECK(ck, std::isfinite(eps) && eps >= 0.0, "eps is ", eps, ", expected a finite eps >= 0");
    c.eps = static_cast<float>(eps);
    if (auto r = ck.optional("residual", residual, Dtype::F32)) {
        ck.shape("residual", *r, {T, L.d_out}, "T, d_out");
        ck.unit_last_stride("residual", *r);
        if (!same_view(*r, ya)) ck.disjoint("residual", *r, "y (other than being y itself)", ya);
        c.res = data_of<const float>(*r);
        c.rs = row_stride(*r);
    }
    py::gil_scoped_release nogil;
    linear_run(L, c, threads);
}

void bind_linear(py::module_& m) {
    py::class_<LinearPlan>(m, "LinearPlan",
        "One projection group's fused grouped-LoRA linear, checked once: see csrc/cpu/binding_linear.cpp")
        .def(py::init<py::object, int64_t, py::object, py::object, py::object, int64_t, int, py::object, int64_t, int>(),
             py::arg("weight"), py::arg("d_out"), py::arg("bias") = py::none(),
             py::arg("parts") = py::tuple(), py::arg("blocks") = py::tuple(), py::arg("num_experts") = 0,
             py::arg("fmt") = static_cast<int>(FMT_F32), py::arg("a_cat") = py::none(), py::arg("d_in") = 0,
             py::arg("expert_fmt") = static_cast<int>(FMT_F32))
        .def("run", &LinearPlan::run, py::arg("x"), py::arg("y"), py::arg("gates") = py::none(),
             py::arg("threads") = 1, py::arg("prologue") = static_cast<int>(PRO_NONE),
             py::arg("norm") = py::none(), py::arg("eps") = 0.0, py::arg("residual") = py::none(),
             "y = (residual +) prologue(x) W^T + bias + the active experts' expand (GIL released)")
        .def_property_readonly("d_in", [](const LinearPlan& p) { return p.core().d_in; })
        .def_property_readonly("d_out", [](const LinearPlan& p) { return p.core().d_out; })
        .def_property_readonly("rank", [](const LinearPlan& p) { return p.core().rank; })
        .def_property_readonly("num_experts", [](const LinearPlan& p) { return p.core().num_experts; })
        .def_property_readonly("fmt", [](const LinearPlan& p) { return p.core().fmt; })
        .def_property_readonly("expert_fmt", [](const LinearPlan& p) { return p.core().efmt; })
        .def_property("bf16_tiles", [](const LinearPlan& p) { return p.core().half_tiles; }, &LinearPlan::set_half_tiles,
                      "a bf16 W's prefill on AMX-BF16 tiles where the CPU has them (csrc/cpu/amx_bf16.h); "
                      "False: the fp32-activation dots at any T (batch-invariant)")
        .def("__repr__", [](const LinearPlan& p) {
            const Linear& l = p.core();
            return cat("LinearPlan(fmt=", format_name(l.fmt), ", expert_fmt=", format_name(l.efmt), ", d_in=", l.d_in, ", d_out=", l.d_out, ", rank=", l.rank,
                       ", num_experts=", l.num_experts, ", parts=", l.parts.size(), ", blocks=",
                       l.blocks.size(), ")");
        });
}

}  // namespace pf_cpu
