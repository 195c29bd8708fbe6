// One decoder block's decode step in one call (the typed API's core; checks in
// binding_block.cpp).  For B rows h [B, d] (contiguous), updated in place:
//
//   qkv = W_qkv rmsnorm(h; attn_norm) (+ experts)        [B, (H + 2 H_kv) D]   linear_run, PRO_RMSNORM
//   a   = attention(qkv) (RoPE, KV write, GQA)           [B, H D]              attention_run
//   h  += W_o a (+ experts)                              [B, d]                linear_run, res = h
//   gu  = W_gu rmsnorm(h; mlp_norm) (+ experts)          [B, 2 f]              linear_run, PRO_RMSNORM
//   h  += W_down silu(gate) * up (+ experts)             [B, d]                linear_run, PRO_SILU_MUL, res = h
//
// the same gates [B, K] (or none: the base model) for the four projection groups.
//
// Tensor parallelism (group != null: this rank holds a shard, o and down row-parallel): the two
// residual updates become h <- sum over ranks of (res_r + W_o,r a_r), res_0 = h and res_r = 0 on
// the other ranks (their o/down outputs overwrite h), summed by group->allreduce(h) in place.  qkv, a and gu
// are thread_local scratch of the calling thread, so two threads may step at once.
#pragma once
#include <cstdint>

#include "attention.h"
#include "linear_plan.h"
#include "shm_group.h"

namespace pf_cpu {

struct DecoderBlock {
    const Linear* qkv = nullptr;   // d -> (H + 2 H_kv) D
    const Linear* o = nullptr;     // H D -> d
    const Linear* gate_up = nullptr;   // d -> 2 f
    const Linear* down = nullptr;  // f -> d
    const float* attn_norm = nullptr;  // [d]
    const float* mlp_norm = nullptr;   // [d]
    float eps = 0.0f;
    int64_t H = 0, H_kv = 0, D = 0;
};

// h [B, d] contiguous; gates [B, K] at row stride gs, or null; attn: everything but qkv, qs and
// out (the step's scratch), with B, H, H_kv, D set.
void block_step(const DecoderBlock& blk, float* h, const float* gates, int64_t gs, AttentionCall attn,
                int threads, ShmGroup* group = nullptr);

}  // namespace pf_cpu
