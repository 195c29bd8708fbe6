// The instruction set of the block-format dot kernels, chosen at run time.
//
// build.py compiles quant_dots.cpp once per variant below that the compiler knows, each with
// its own flags and namespace (simd.h's PF_ISA); every other file is built for the baseline
// (AVX2/FMA/F16C), so one build runs on any such CPU and uses VNNI where the CPU has it:
//
//   amx         avx512vnni, and AMX-INT8 tiles for the block formats' dots over many tokens
//               (amx.h: prefill); needs amx-tile, amx-int8 and the OS's grant of the tile state;
//               with amx-bf16 too, every product of a bf16 W on AMX-BF16 tiles (amx_bf16.h)
//   avx512vnni  vpdpbusd on 256-bit vectors, EVEX (Cascade Lake and later Xeons, Zen 4)
//               needs avx512f, avx512bw, avx512vl, avx512vnni
//   avxvnni     vpdpbusd, VEX (Alder Lake, Sapphire Rapids and later)   needs avxvnni
//   avx2        maddubs + madd (the baseline)
//
// The same variants hold expand_q8.h's expand (the q8 experts', integer dots too) and half.h's
// 16-bit dots (fp32 FMAs, 16 lanes in avx512vnni: the same sums lane by lane, bit-identical).
// The first variant the CPU supports is used unless set_isa (PF_CPU_ISA from Python) picks
// another; every variant computes the same integers, so their outputs are bit-identical, but
// for a bf16 W under amx with AMX-BF16 (its activations rounded to bf16: amx_bf16.h).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "quant_format.h"

namespace pf_cpu {

// quant.h's qrows_dots: out[r os + t] = w_r . x[t] for R rows of a block format and T tokens.
using QrowsDots = void (*)(int fmt, const uint8_t* w, int64_t rb, int64_t R, const XRow* X, int T,
                           int64_t nb, float* out, int64_t os);

// expert.h's expand_q8: y[t, 8g + i] += sum over blocks a of the block's 8-bit panel against its
// quantized h, for groups g0 <= g < g1 and columns 8g + i < valid.
using ExpandQ8 = void (*)(const PanelBlock* blk, int nblk, int64_t g0, int64_t g1, const int32_t* hw,
                          int64_t hws, const float* sh, int64_t shs, int T, float* y, int64_t ys, int64_t valid);

// amx.h's qrows_tiles: out[r os + t] = w_r . x[16 G + t] for R (a multiple of 16) rows of a
// has_tiles format and the T <= 16 tokens of token group G of xt.
using QrowsTiles = void (*)(int fmt, const uint8_t* w, int64_t rb, int64_t R, const XTiles& xt, int64_t G,
                            int T, float* out, int64_t os);

// half.h's hrows_dots: out[r os + t] = w_r . x[t] for R 16-bit rows and T fp32 tokens.
using HrowsDots = void (*)(int fmt, const uint8_t* w, int64_t rb, int64_t R, const float* x, int64_t xs, int T,
                           int64_t d, float* out, int64_t os);

// amx_bf16.h's hrows_tiles: out[r os + t] = w_r . bf16(x)[16 G + t] for R rows of a bf16 W (d
// values a row) and the T <= 16 tokens of token group G of xb (quant_format.h's layout).
using HrowsTiles = void (*)(const uint8_t* w, int64_t rb, int64_t R, const uint16_t* xb, int64_t G, int T,
                            int64_t d, float* out, int64_t os);

struct IsaInfo {
    std::string name, needs;
    bool supported;            // by this CPU (and its OS)
};

std::vector<IsaInfo> isas();   // the variants compiled in, best first
std::string isa();             // the one in use
void set_isa(const std::string& name);   // std::invalid_argument (one line) if unknown or unsupported
QrowsDots qrows_dots_kernel(); // the one in use
ExpandQ8 expand_q8_kernel();
HrowsDots hrows_dots_kernel();
QrowsTiles qrows_tiles_kernel();   // null unless the variant in use has tiles
HrowsTiles hrows_tiles_kernel();   // null unless it has them and the CPU has AMX-BF16

}  // namespace pf_cpu
