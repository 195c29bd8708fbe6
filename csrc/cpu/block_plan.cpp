// block_step: block_plan.h's decode step as four linear_run calls and one attention_run.
#include "block_plan.h"

#include <cstddef>
#include <vector>

namespace pf_cpu {

void block_step(const DecoderBlock& blk, float* h, const float* gates, int64_t gs, AttentionCall attn,
                int threads, ShmGroup* group) {
    thread_local std::vector<float> qkv, a, gu;
    const int64_t B = attn.B, d = blk.qkv->d_in;
    qkv.resize(static_cast<size_t>(B * blk.qkv->d_out));
    a.resize(static_cast<size_t>(B * blk.o->d_in));
    gu.resize(static_cast<size_t>(B * blk.gate_up->d_out));

    // One call of a group: y = (res +) W_aug-linear of the prologue of x.
    auto linear = [&](const Linear& lin, const float* x, int64_t xs, float* y, int pro,
                      const float* norm, const float* res) {
        LinearCall c;
        c.x = x; c.xs = xs; c.T = B;
        c.y = y; c.ys = lin.d_out;
        c.gates = gates; c.gs = gs;
        c.prologue = pro; c.norm = norm; c.eps = blk.eps;
        c.res = res; c.rs = lin.d_out;
        linear_run(lin, c, threads);
    };
    linear(*blk.qkv, h, d, qkv.data(), PRO_RMSNORM, blk.attn_norm, nullptr);
    attn.qkv = qkv.data();
    attn.qs = blk.qkv->d_out;
    attn.out = a.data();
    attention_run(attn, threads);
    const float* res = group && group->rank() != 0 ? nullptr : h;    // block_plan.h: res_r
    linear(*blk.o, a.data(), blk.o->d_in, h, PRO_NONE, nullptr, res);
    if (group) group->allreduce(h, B * d);
    linear(*blk.gate_up, h, d, gu.data(), PRO_RMSNORM, blk.mlp_norm, nullptr);
    linear(*blk.down, gu.data(), blk.gate_up->d_out, h, PRO_SILU_MUL, nullptr, res);
    if (group) group->allreduce(h, B * d);
}

}  // namespace pf_cpu
