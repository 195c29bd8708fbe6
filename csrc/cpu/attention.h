// One decode step's attention for B rows: RoPE, the KV-cache write and grouped-query attention
// (the typed API's core; checks in binding_attention.cpp):
//
// Row b (slot row0 + b of one layer of the slot cache) has one new token whose projections are
// qkv[b] = [q_0 .. q_{H-1} | k_0 .. k_{H_kv-1} | v_0 .. v_{H_kv-1}], each head D floats (D even).
//   1. per kv head h: k_h <- rope(k_h), written with v_h at column cols[b] of the slot:
//        rope(x)[d] = x[d] cos[b, i, d] + x[(d + D/2) mod D] sin[b, i, d]
//      (cos, sin [B, H + H_kv, D]: sin carries rotate_half's sign, the q heads' rows the
//      1/sqrt(D) scale; model.Rotary.tables)
//   2. per query head i (kv head h = i / (H / H_kv)):
//        s_j = rope(q_i) . K[h, j] + bias[b, j]       j < L      (bias: 0 or -inf, the mask)
//        out[b, i] = sum_j softmax(s)_j V[h, j]
// Caches: one layer of the pool, [slots, H_kv, max_len, D] contiguous.  out [B, H * D]
// contiguous.  The write (B * H_kv heads, a few hundred floats) runs on the caller; the heads are
// one parallel region of B * H chunks.
#pragma once
#include <cstdint>

namespace pf_cpu {

struct AttentionCall {
    const float* qkv = nullptr;          // [B, (H + 2 H_kv) D], row stride qs
    int64_t qs = 0;
    int64_t B = 0, H = 0, H_kv = 0, D = 0;
    const float* cos = nullptr;          // [B, H + H_kv, D] contiguous
    const float* sin = nullptr;
    float* k = nullptr;                  // [slots, H_kv, max_len, D] contiguous: one layer
    float* v = nullptr;
    int64_t max_len = 0, row0 = 0;
    const int64_t* slots = nullptr;      // [B] row b's slot, or nullptr: slot row0 + b
    const int64_t* cols = nullptr;       // [B], each in [0, L)
    int64_t L = 0;
    const float* bias = nullptr;         // [B, L], row stride bs
    int64_t bs = 0;
    float* out = nullptr;                // [B, H * D] contiguous
};

// Row b's slot: slots[b] when given (several rows of one slot: the tokens of a prefill chunk,
// each attending over its own columns; every k, v is written before any head reads), else
// row0 + b.
inline int64_t slot_of(const AttentionCall& c, int64_t b) { return c.slots ? c.slots[b] : c.row0 + b; }

void attention_run(const AttentionCall& call, int threads);

}  // namespace pf_cpu
