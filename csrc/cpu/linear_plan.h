// One projection group's fused grouped-LoRA linear: the typed API's core (no Python here; the
// checks are binding_linear.cpp's, and every pointer and size below has passed them).
//
// For token rows x [T, d_in] (1 <= T <= MAX_LINEAR_ROWS) and a group (q|k|v, gate|up, o, down) with base
// weight W [d_out, d_in] in one of quant_format.h's formats (fp32, 16-bit floats, or 8/4-bit
// blocks) and experts stacked as A_cat [R, d_in] and B^T per part, both in the experts' format
// (expert.h: fp32, bf16 or q8_0; fp32 experts on an fp32 W: the rows below W in one
// W_aug = [W; A_cat]):
//
//   y[t, o] = W[o] . x'[t] + bias[o] + res[t, o]
//           + sum over active blocks j of o's part p: sum_{r in j} bT_p[r - r0_p, o - out0_p] h[t, r]
//   h[t, r] = (A_cat[r] . x'[t]) * gates[t, e_j] * s_j                       r in block j
//
// (q8_0 experts: A_cat[r] . x'[t] is the block dot against x' quantized per block, as a q8_0 W's.)
//
// A block is one expert's rank rows in one part (projection); it is active when its expert's
// gate is nonzero for some row t (no gates: none is).  The prologue makes x' once, before the
// GEMVs (and, for a block-quantized W, quantizes x' per block of 32 once: quant.h's XRow, which
// W's rows are dotted with, by the instruction set isa.h chose; 16-bit rows and A_cat's rows
// read x' itself):  PRO_NONE x' = x;  PRO_RMSNORM x'[t] = norm * x[t] / sqrt(mean(x[t]^2) + eps);
// PRO_SILU_MUL x [T, 2 d_in] = gate | up, x'[t, k] = silu(x[t, k]) * x[t, d_in + k].
// res (optional) may be y itself: an in-place residual update.
//
// (q8 experts: the expand's h is quantized per token and block, expert.h.)
//
// One parallel region (pool.h) of many small chunks, the A chunks' then the W chunks':
//   A chunk   active rows of A_cat (~chunk bytes of them): h; the thread finishing the last one
//             quantizes h (q8) and marks it ready;
//   W chunk   rows i0:i1 of W (~chunk bytes): y rows (+ bias, + res), the tokens in groups of
//             MAX_ROWS (the chunk's rows stay in L2: W streams from memory once per call, and a
//             token's dots sum in the same order in any group); then, if the rows lie in an
//             active part, that part's expand over the same columns, h ready: the chunk's y
//             rows are still in L1 and no thread waits for another's rows of W.  f32 / bf16:
//             the active rank rows of bT across the columns, four at a time, in 256-column tiles;
//             q8: each 8 columns' panel groups of every active block, dotted with h quantized
//             (expand_q8.h).  Chunks never straddle an active part's edge, and inside one start a
//             multiple of EXPERT_COL_ALIGN columns from its first, so a panel group is one chunk's.
// Chunks are claimed in order: every A chunk is claimed before any W chunk, so an expand waits
// only when an A chunk's thread was descheduled.  One barrier-free region per call.
// Scratch (x', h, the routing lists) is thread_local to the calling thread.
#pragma once
#include <cstdint>
#include <vector>

#include "quant_format.h"

namespace pf_cpu {

constexpr int64_t MAX_ROWS = 16;     // rows per call of the typed API (attention, blocks), and
                                     // the token group of a LinearPlan call's dots
constexpr int64_t MAX_LINEAR_ROWS = 4096;   // rows per LinearPlan call: groups of MAX_ROWS

enum Prologue : int { PRO_NONE = 0, PRO_RMSNORM = 1, PRO_SILU_MUL = 2 };

struct LoraPart {              // output columns out0:out1, rows r0:r1 of A_cat (0-based in R)
    int64_t out0, out1, r0, r1;
    const uint8_t* bT;         // f32 / bf16 experts: B^T, r1 - r0 rows (expert.h) at bstride
    int64_t bstride;           //   bytes; q8: its blocks' panels, one after another (expert.h)
    int64_t b0, b1;            // its blocks: blocks[b0:b1]
};

struct LoraBlock {             // one expert's rows r0:r1 of A_cat inside its part
    int64_t expert, r0, r1;
    float scale;
    int64_t boff = 0;          // q8: its panel at bT + boff, groups of 4 + 32 nq bytes
    int64_t nq = 0;            //   nq = ceil((r1 - r0) / 4)
};

struct Linear {
    int fmt = FMT_F32;             // W's format (quant_format.h)
    const float* w = nullptr;      // FMT_F32: W [d_out, d_in] (rows of W_aug)
    const uint8_t* wq = nullptr;   // any other: W [d_out, row_bytes]
    int64_t row_bytes = 0;         // bytes of one row of W
    int efmt = FMT_F32;            // the experts' format: FMT_F32, FMT_BF16 or FMT_Q8_0
    const uint8_t* a = nullptr;    // A_cat: rank rows of a_row_bytes in efmt, or null (rank 0)
    int64_t a_row_bytes = 0;
    const float* bias = nullptr;   // [d_out] or null
    int64_t d_in = 0, d_out = 0, rank = 0, num_experts = 0;
    std::vector<LoraPart> parts;   // increasing, non-overlapping in columns and rows
    std::vector<LoraBlock> blocks; // by part, increasing rows
    bool half_tiles = true;        // a bf16 W takes AMX-BF16 tiles in calls of many tokens where the
                                   // CPU has them (amx_bf16.h); false: half.h's dots at any T
};

struct LinearCall {
    const float* x = nullptr;      // [T, d_in] ([T, 2 d_in] with PRO_SILU_MUL), row stride xs
    int64_t xs = 0, T = 0;
    float* y = nullptr;            // [T, d_out], row stride ys; written
    int64_t ys = 0;
    const float* gates = nullptr;  // [T, num_experts], row stride gs; null: base only
    int64_t gs = 0;
    int prologue = PRO_NONE;
    const float* norm = nullptr;   // [d_in] with PRO_RMSNORM
    float eps = 0.0f;
    const float* res = nullptr;    // [T, d_out], row stride rs, or null; may be y
    int64_t rs = 0;
};

void linear_run(const Linear& lin, const LinearCall& call, int threads);

// Chunk size (tuning): a chunk takes about ``bytes`` of W's rows, or of A_cat's active rows.  A
// region smaller than one chunk runs inline.
struct Chunking {
    int64_t bytes = 65536;
};
Chunking chunking();
void set_chunking(const Chunking& c);

}  // namespace pf_cpu
