// The weight formats of csrc/cpu: their codes, a row's byte layout and the quantized activation
// row.  Plain data and arithmetic, no intrinsics: every translation unit shares these types,
// whatever instruction set it is compiled for (isa.h).
//
//   FMT_F32   float32 rows (W_aug = [W; A_cat], linear_plan.h)
//   FMT_Q8_0, FMT_Q4_0, FMT_Q4_1, FMT_Q5_0   blocks of 32, repacked per field (quant.h)
//   FMT_Q4_K, FMT_Q5_K, FMT_Q6_K             super-blocks of 256 (eight blocks of 32 with their own
//                                            integer scales), repacked per field (quant.h)
//   FMT_F16, FMT_BF16                        16-bit floats, d_in values a row, as stored (half.h)
#pragma once
#include <cstdint>

namespace pf_cpu {

enum Format : int {
    FMT_F32 = 0, FMT_Q8_0 = 1, FMT_Q4_0 = 2, FMT_Q4_1 = 3, FMT_F16 = 4, FMT_BF16 = 5,
    FMT_Q5_0 = 6, FMT_Q4_K = 7, FMT_Q5_K = 8, FMT_Q6_K = 9,
};
constexpr int FMT_LAST = FMT_Q6_K;
constexpr int64_t QK = 32;          // values per block
constexpr int64_t QK_K = 256;       // values per K-quant super-block (eight blocks)

inline bool is_half(int fmt) { return fmt == FMT_F16 || fmt == FMT_BF16; }
inline bool is_kquant(int fmt) { return fmt == FMT_Q4_K || fmt == FMT_Q5_K || fmt == FMT_Q6_K; }
inline bool is_block(int fmt) { return fmt >= FMT_Q8_0 && fmt <= FMT_LAST && !is_half(fmt); }
// The formats whose nibbles pair two blocks (quant.h): their activations are quantized in pair order.
inline bool is_paired(int fmt) {
    return fmt == FMT_Q4_0 || fmt == FMT_Q4_1 || fmt == FMT_Q5_0 || fmt == FMT_Q4_K || fmt == FMT_Q5_K;
}
// What d_in must be a multiple of in this format.
inline int64_t row_multiple(int fmt) { return is_kquant(fmt) ? QK_K : QK; }

inline const char* format_name(int fmt) {
    switch (fmt) {
        case FMT_F32: return "f32";
        case FMT_Q8_0: return "q8_0";
        case FMT_Q4_0: return "q4_0";
        case FMT_Q4_1: return "q4_1";
        case FMT_F16: return "f16";
        case FMT_BF16: return "bf16";
        case FMT_Q5_0: return "q5_0";
        case FMT_Q4_K: return "q4_k";
        case FMT_Q5_K: return "q5_k";
        case FMT_Q6_K: return "q6_k";
        default: return "?";
    }
}

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Byte offsets of a stored row's fields and its size (-1: no such field) for nb = d_in / 32
// blocks (quant.h's table); a 16-bit row is one field of 2 d_in bytes.
struct RowLayout {
    int64_t d, m, q, bytes;
    int64_t sc = -1, mn = -1, h = -1;    // K-quants' block scales and mins; Q5's high bits
};

inline RowLayout row_layout(int fmt, int64_t nb) {
    const int64_t s = 2 * round_up(nb, 8), n2 = round_up(nb, 2), ns = nb / 8;
    switch (fmt) {
        case FMT_Q8_0: return {0, -1, s, s + 32 * nb};
        case FMT_Q4_0: return {0, -1, s, s + 16 * n2};
        case FMT_Q4_1: return {0, s, 2 * s, 2 * s + 16 * n2};
        case FMT_Q5_0: return {0, -1, s + 4 * n2, s + 20 * n2, -1, -1, s};
        case FMT_Q4_K: return {0, 2 * ns, 4 * ns + 2 * nb, 4 * ns + 18 * nb, 4 * ns, 4 * ns + nb};
        case FMT_Q5_K: return {0, 2 * ns, 4 * ns + 6 * nb, 4 * ns + 22 * nb, 4 * ns, 4 * ns + nb, 4 * ns + 2 * nb};
        case FMT_Q6_K: return {0, -1, 18 * ns, 210 * ns, 2 * ns};
        default: return {-1, -1, 0, 2 * QK * nb};     // FMT_F16, FMT_BF16
    }
}

// One token's quantized activation: d, s [nb8] (zero padded), q [nb2 * 32] (pairwise for Q4).
struct XRow {
    float* d;
    float* s;
    int8_t* q;
};

// Floats per token of the activation scratch: d, s, then q as bytes.
inline int64_t xrow_floats(int64_t nb) { return 2 * round_up(nb, 8) + round_up(nb, 2) * QK / 4; }

inline XRow xrow_at(float* base, int64_t nb) {
    const int64_t n8 = round_up(nb, 8);
    return {base, base + n8, reinterpret_cast<int8_t*>(base + 2 * n8)};
}

// A call's quantized activations packed for AMX tiles (amx.h), made once per call from its XRows
// (linear_x.cpp's pack_tiles): tokens in groups of 16 (the last zero padded), and for group G
// and block b (values in block order, also for the paired formats):
//   q + (G nb + b) 512     the B tile: 8 rows of 16 tokens x 4 int8, row k holding values
//                          4k..4k+3 of every token (AMX's VNNI layout)
//   d + (G nb + b) 16      d_x of the 16 tokens; s likewise s_x (XRow's d and s)
struct XTiles {
    const int8_t* q = nullptr;
    const float* d = nullptr;
    const float* s = nullptr;
    int64_t nb = 0;
};
constexpr int64_t TILE_ROWS = 16;   // weight rows per AMX tile, and tokens per token group

// A call's x' for a bf16 W on AMX-BF16 tiles (amx_bf16.h; linear_x.cpp's pack_htiles): each
// value rounded to bf16, tokens in groups of 16 (the last zero padded), K in chunks of 32 (d is a
// multiple of 32): value k of token n of group G at
//   (G nk + k / 32) 512 + ((k % 32) / 2) 32 + 2 n + k % 2      (nk = d / 32; uint16)
// so each chunk is a B tile of 16 rows, row p holding values 2p, 2p + 1 of every token.

// The formats amx.h runs: the 32-blocks and Q4_K / Q5_K (Q6_K's 16-value scales stay vector).
inline bool has_tiles(int fmt) { return is_block(fmt) && fmt != FMT_Q6_K; }

// One active expert block of a q8 part in pass 2 (expert.h's panels): its groups of 8 output
// columns at panel + g * gstride bytes (an fp32 scale, then nq quads of 8 columns x 4 int8
// values), and its activation h quantized per token: nq int32 words (4 int8 values each) at
// hw + t * hws + hoff, scale sh[t * shs + a] for the block's index a in the call.
struct PanelBlock {
    const uint8_t* panel;
    int64_t gstride, nq, hoff;
};

}  // namespace pf_cpu
