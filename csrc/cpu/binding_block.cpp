// BlockPlan: the typed binding of block_plan.h, one decoder block's decode step in one call.
//
//   BlockPlan(qkv, o, gate_up, down, attn_norm, mlp_norm, eps, n_heads, n_kv_heads, head_dim)
//     four LinearPlans with the shapes of one block (d = qkv.d_in, f = down.d_in):
//       qkv d -> (H + 2 H_kv) D,  o H D -> d,  gate_up d -> 2 f,  down f -> d,
//     the same num_experts; attn_norm, mlp_norm float32 [d] contiguous; H % H_kv == 0, D even.
//   step(h, gates, cos, sin, k_cache, v_cache, layer, row0, cols, bias, threads=1, group=None,
//        slots=None)
//     h float32 [B, d] C-contiguous, updated in place to the block's output; gates float32
//     [B, num_experts] unit last stride or None (the base model); the rest as decode_attention's
//     (with H, H_kv, D the plan's); group: a ShmGroup or None, the step of a tensor-parallel
//     shard (block_plan.h: o's and down's outputs summed over the ranks through it); slots:
//     None, or int64 [B], row b's slot (rows may share a slot, each attending over its own
//     columns: several tokens of one request, runtime/speculative.py), as decode_attention's.
#include <cmath>

#include "binding.h"
#include "block_plan.h"
#include "pool.h"

namespace pf_cpu {
namespace {

class BlockPlan {
public:
    BlockPlan(py::object qkv, py::object o, py::object gate_up, py::object down,
              py::object attn_norm, py::object mlp_norm, double eps, int64_t n_heads,
              int64_t n_kv_heads, int64_t head_dim) {
        const Checker ck("BlockPlan");
        const char* names[4] = {"qkv", "o", "gate_up", "down"};
        py::object objs[4] = {qkv, o, gate_up, down};
        const Linear* lin[4];
        for (int i = 0; i < 4; ++i) {
            if (!py::isinstance<LinearPlan>(objs[i]))
                ck.fail_type(cat(names[i], " is ", std::string(py::str(py::type::handle_of(objs[i]).attr("__name__"))),
                                 ", expected a LinearPlan"));
            plans_[i] = objs[i];
            lin[i] = &objs[i].cast<const LinearPlan&>().core();
        }
        ck.in_range("n_heads", n_heads, 1, 1 << 20);
        ck.in_range("n_kv_heads", n_kv_heads, 1, n_heads, "n_heads");
        PF_CHECK(ck, n_heads % n_kv_heads == 0, "n_heads is ", n_heads, ", expected a multiple of n_kv_heads = ", n_kv_heads);
        PF_CHECK(ck, head_dim >= 2 && head_dim % 2 == 0, "head_dim is ", head_dim, ", expected an even head_dim >= 2");
        PF_CHECK(ck, std::isfinite(eps) && eps >= 0.0, "eps is ", eps, ", expected a finite eps >= 0");
        const int64_t d = lin[0]->d_in, H = n_heads, H_kv = n_kv_heads, D = head_dim;
        ck.equal("qkv.d_out", lin[0]->d_out, (H + 2 * H_kv) * D, "(n_heads + 2*n_kv_heads)*head_dim");
        ck.equal("o.d_in", lin[1]->d_in, H * D, "n_heads*head_dim");
        ck.equal("o.d_out", lin[1]->d_out, d, "d = qkv.d_in");
        ck.equal("gate_up.d_in", lin[2]->d_in, d, "d = qkv.d_in");
        ck.equal("gate_up.d_out", lin[2]->d_out, 2 * lin[3]->d_in, "2*down.d_in");
        ck.equal("down.d_out", lin[3]->d_out, d, "d = qkv.d_in");
        for (int i = 1; i < 4; ++i)
            ck.equal(cat(names[i], ".num_experts"), lin[i]->num_experts, lin[0]->num_experts, "qkv.num_experts");
        const char* norm_names[2] = {"attn_norm", "mlp_norm"};
        py::object norm_objs[2] = {attn_norm, mlp_norm};
        for (int i = 0; i < 2; ++i) {
            norms_[i] = ck.array(norm_names[i], norm_objs[i], Dtype::F32);
            ck.shape(norm_names[i], norms_[i], {d}, "d = qkv.d_in");
            ck.c_contiguous(norm_names[i], norms_[i]);
        }
        blk_.qkv = lin[0];
        blk_.o = lin[1];
        blk_.gate_up = lin[2];
        blk_.down = lin[3];
        blk_.attn_norm = data_of<const float>(norms_[0]);
        blk_.mlp_norm = data_of<const float>(norms_[1]);
        blk_.eps = static_cast<float>(eps);
        blk_.H = H;
        blk_.H_kv = H_kv;
        blk_.D = D;
    }

    void step(py::object h, py::object gates, py::object cos, py::object sin, py::object k_cache,
              py::object v_cache, int64_t layer, int64_t row0, py::object cols, py::object bias,
              int threads, py::object group, py::object slots) const {
        const Checker ck("BlockPlan.step");
        ShmGroup* grp = nullptr;
        if (!group.is_none()) {
            if (!py::isinstance<PyShmGroup>(group))
                ck.fail_type(cat("group is ", std::string(py::str(py::type::handle_of(group).attr("__name__"))),
                                 ", expected a ShmGroup or None"));
            grp = &group.cast<const PyShmGroup&>().core();
        }
        check_threads(ck, threads);
        const int64_t d = blk_.qkv->d_in, K = blk_.qkv->num_experts;
        py::array ha = ck.array("h", h, Dtype::F32);
        ck.ndim("h", ha, 2, "B, d");
        const int64_t B = ha.shape(0);
        ck.in_range("B = h.shape[0]", B, 1, MAX_ROWS, "MAX_ROWS");
        ck.shape("h", ha, {B, d}, "B, d");
        ck.c_contiguous("h", ha);
        ck.writable("h", ha);
        const float* g = nullptr;
        int64_t gs = 0;
        if (auto ga = ck.optional("gates", gates, Dtype::F32)) {
            ck.shape("gates", *ga, {B, K}, "B, num_experts");
            ck.unit_last_stride("gates", *ga);
            ck.disjoint("gates", *ga, "h", ha);
            g = data_of<const float>(*ga);
            gs = row_stride(*ga);
        }
        py::array c = ck.array("cos", cos, Dtype::F32), s = ck.array("sin", sin, Dtype::F32);
        py::array k = ck.array("k_cache", k_cache, Dtype::F32), v = ck.array("v_cache", v_cache, Dtype::F32);
        AttentionCall call;
        std::vector<int64_t> cols_buf, slots_buf;
        check_attention(ck, B, blk_.H, blk_.H_kv, blk_.D, c, s, k, v, layer, row0, cols, bias, call, cols_buf,
                        slots, &slots_buf);
        for (const auto& [name, a] : {std::pair<const char*, const py::array&>{"cos", c}, {"sin", s},
                                      {"k_cache", k}, {"v_cache", v}}) {
            ck.disjoint("h", ha, name, a);
        }
        ck.disjoint("h", ha, "bias", ck.array("bias", bias, Dtype::F32));
        for (int i = 0; i < 4; ++i)
            ck.disjoint("h", ha, "a plan's w_aug", plans_[i].cast<const LinearPlan&>().w_aug());
        py::gil_scoped_release nogil;
        block_step(blk_, data_of<float>(ha), g, gs, call, threads, grp);
    }

    const DecoderBlock& core() const { return blk_; }

private:
    py::object plans_[4];          // keeps the LinearPlans (and their arrays) alive
    py::array norms_[2];
    DecoderBlock blk_;
};

}  // namespace

void bind_block(py::module_& m) {
    py::class_<BlockPlan>(m, "BlockPlan",
        "One decoder block's decode step in one call: see csrc/cpu/binding_block.cpp")
        .def(py::init<py::object, py::object, py::object, py::object, py::object, py::object, double,
                      int64_t, int64_t, int64_t>(),
             py::arg("qkv"), py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("attn_norm"),
             py::arg("mlp_norm"), py::arg("eps"), py::arg("n_heads"), py::arg("n_kv_heads"),
             py::arg("head_dim"))
        .def("step", &BlockPlan::step, py::arg("h"), py::arg("gates"), py::arg("cos"), py::arg("sin"),
             py::arg("k_cache"), py::arg("v_cache"), py::arg("layer"), py::arg("row0"), py::arg("cols"),
             py::arg("bias"), py::arg("threads") = 1, py::arg("group") = py::none(),
             py::arg("slots") = py::none(),
             "h [B, d] <- the block's output for one decode step (writes k, v at cols; slots: "
             "row b's slot, rows may share one, else row0 + b); GIL released")
        .def_property_readonly("d", [](const BlockPlan& b) { return b.core().qkv->d_in; })
        .def_property_readonly("num_experts", [](const BlockPlan& b) { return b.core().qkv->num_experts; })
        .def("__repr__", [](const BlockPlan& b) {
            const DecoderBlock& k = b.core();
            return cat("BlockPlan(d=", k.qkv->d_in, ", n_heads=", k.H, ", n_kv_heads=", k.H_kv,
                       ", head_dim=", k.D, ", intermediate=", k.down->d_in, ", num_experts=",
                       k.qkv->num_experts, ")");
        });
}

}  // namespace pf_cpu
