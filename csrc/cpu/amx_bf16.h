// bf16 weights on AMX-BF16 tiles (Sapphire Rapids and later Xeons): the prefill path of a bf16 W
// in the "amx" variant (isa.h), calls of at least HALF_TILE_MIN tokens (linear_plan.cpp).
//
// Per 16 weight rows and one group of T <= 16 tokens, K in chunks of 32 values:
//
//   C [16 rows, T tokens] fp32 += A [16 rows, 32 values] . B [32 values, T tokens]   (TDPBF16PS)
//
// with A the rows as stored (bf16, loaded at stride rb) and B the tokens' x' rounded to bf16
// (round to nearest even, as llama.cpp rounds its activations for a BF16 W) in AMX's pair layout
// (quant_format.h's bf16 tiles: packed once per call).  So y = W . bf16(x'), summed in the tile
// unit's own order.  That order is not a chain of fp32 FMAs (measured here: neither sequential
// FMAs, pair sums nor VDPBF16PS give its bits), so half.h's fp32-activation dots (decode, and
// calls of fewer tokens) are not the same bits: a bf16 model's tokens can then depend on the
// batch and the prefill chunking, unless the plan turns the tiles off (deterministic=True).
// Each C element reads only its row and its token, so the tiles' outputs are the same at any T
// (and any row count, chunking or threads) among calls that take them (tests/test_isa.py).
//
// Tiles against half.h on the same call (1536 x 576, 2 threads, Xeon with AMX): 2.5x the
// throughput at 16 tokens, 1.3x at 8, 0.85x at 4; one token 0.63x (25 against 27 GB/s one thread
// at best in a standalone loop: the strided tile loads do not keep the memory busy), hence
// prefill only.
//
// d is a multiple of 32 (a bf16 row's, quant_format.h's row_multiple); a last block of fewer than
// 16 rows is loaded as a tile of that many rows, so a tile never reads outside W.  Two row blocks
// share each B tile; the next two blocks' rows are asked for one chunk ahead.
//
// Compiled only into the amx variant (quant_dots.cpp with -mamx-bf16); each call loads its tile
// configuration and releases it at the end, as amx.h does.
#pragma once
#if defined(__AMX_BF16__) && defined(__AVX512F__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "quant_format.h"

namespace pf_cpu {
namespace PF_ISA {

// tmm0, tmm1: C (m rows x T fp32); tmm2, tmm3: A (m rows x 32 bf16); tmm4: B (16 pair rows x T
// tokens x 2 bf16).  m = 16 but for a last block of fewer rows (a tile never reads past R); T
// columns, not 16: each C element is its row's and token's alone, and fewer columns run faster.
inline void load_htile_config(int m, int T) {
    alignas(64) uint8_t cfg[64] = {};
    cfg[0] = 1;                                   // palette
    for (int t = 0; t < 5; ++t) {
        cfg[16 + 2 * t] = static_cast<uint8_t>(t == 0 || t == 1 || t == 4 ? 4 * T : 64);   // bytes a row
        cfg[48 + t] = static_cast<uint8_t>(t == 4 ? TILE_ROWS : m);                        // rows
    }
    asm volatile("" : : "r"(cfg) : "memory");     // the stores above happen first
    _tile_loadconfig(cfg);
}

// NB (1 or 2) blocks of ``rows`` rows of w at stride rb (16, or fewer for the last, with the tile
// configuration to match) against token group xb (nk B tiles); C[j] to out (rows at stride os,
// T tokens).
template <int NB>
inline void hblocks(const uint8_t* w, int64_t rb, int64_t nk, const uint16_t* xb, int T, int64_t rows, float* out,
                    int64_t os) {
    alignas(64) float c[NB][TILE_ROWS][TILE_ROWS];
    _tile_zero(0);
    if constexpr (NB == 2) _tile_zero(1);
    const uint8_t* ahead = w + NB * TILE_ROWS * rb;
    for (int64_t k = 0; k < nk; ++k) {
        for (int64_t m = 0; m < NB * TILE_ROWS; ++m)
            _mm_prefetch(reinterpret_cast<const char*>(ahead + m * rb + 64 * k), _MM_HINT_T0);
        _tile_loadd(4, xb + k * 512, 64);
        _tile_loadd(2, w + 64 * k, rb);
        if constexpr (NB == 2) _tile_loadd(3, w + TILE_ROWS * rb + 64 * k, rb);
        _tile_dpbf16ps(0, 2, 4);
        if constexpr (NB == 2) _tile_dpbf16ps(1, 3, 4);
    }
    _tile_stored(0, c[0], 64);
    if constexpr (NB == 2) _tile_stored(1, c[1], 64);
    for (int j = 0; j < NB; ++j)                  // C rows at 64 bytes, T values each
        for (int64_t m = 0; m < rows; ++m)
            std::memcpy(out + (j * TILE_ROWS + m) * os, c[j][m], sizeof(float) * static_cast<size_t>(T));
}

// out[r * os + t] = w_r . bf16(x)[16 G + t] for R rows (any count) of a bf16 W with d values a
// row, and the T <= 16 tokens of token group G of xb (quant_format.h's layout).
inline void hrows_tiles(const uint8_t* w, int64_t rb, int64_t R, const uint16_t* xb, int64_t G, int T, int64_t d,
                        float* out, int64_t os) {
    const int64_t nk = d / 32;
    const uint16_t* xg = xb + G * nk * 512;
    load_htile_config(TILE_ROWS, T);
    int64_t r = 0;
    for (; r + 2 * TILE_ROWS <= R; r += 2 * TILE_ROWS)
        hblocks<2>(w + r * rb, rb, nk, xg, T, TILE_ROWS, out + r * os, os);
    if (r + TILE_ROWS <= R) {
        hblocks<1>(w + r * rb, rb, nk, xg, T, TILE_ROWS, out + r * os, os);
        r += TILE_ROWS;
    }
    if (r < R) {                                       // the last 1..15 rows: tiles of that many
        const int m = static_cast<int>(R - r);
        load_htile_config(m, T);
        hblocks<1>(w + r * rb, rb, nk, xg, T, m, out + r * os, os);
    }
    _tile_release();
}

}  // namespace PF_ISA
}  // namespace pf_cpu
#endif
