// The block formats' dots on AMX tiles (Sapphire Rapids and later Xeons): the prefill path of the
// "amx" variant (isa.h), for 16 weight rows at a time against one group of 16 tokens.
//
// Per block b of 32 values, one tile product gives every (row, token) pair's integer total:
//
//   C [16 rows, 16 tokens] int32 = A [16 rows, 32 values] . B [32 values, 16 tokens]
//
// with A the rows' values (Q8_0: signed, loaded from the rows as stored at stride rb; the paired
// formats: unsigned, their nibbles (and fifth bits) unpacked into block order first: TDPBUSD)
// and B the tokens' quantized values (XTiles, quant_format.h: packed once per call).  The rest is
// quant.h's qtile, lane for lane: lane j = b mod 8 of (row, token) accumulates
//
//   acc_j = fma(d_w d_x, float(C), acc_j)          block by block, in order
//   accm_j = fma(m_w, s_x, accm_j)                 (the formats with a per-block term)
//
// and the dot is hsum(acc) (+ factor hsum(accm)) in hsum's order (simd.h), here across 16 tokens
// at once: the same float operations on the same integers, so the same bits as every vector
// variant (tests/test_isa.py).  C's integers are exact: |C| <= 32 * 127 * 127 < 2^24, so float(C)
// is too.
//
// Compiled only into the amx variant (quant_dots.cpp with -mamx-tile -mamx-int8); the OS grants
// the tile state to the process once (isa.cpp), and each call loads its tile configuration
// (another library, oneDNN, may have changed the thread's) and releases it at the end.
#pragma once
#if defined(__AMX_INT8__) && defined(__AVX512F__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "quant.h"
#include "quant_format.h"

namespace pf_cpu {
namespace PF_ISA {

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// Two blocks at a time: tmm0 / tmm3 C (16 rows x 16 int32), tmm1 / tmm4 A (16 rows x 32 int8),
// tmm2 / tmm5 B (8 rows x 64 int8): the second product runs while the first one's C is stored.
inline void load_tile_config() {
    TileConfig cfg;
    for (int k = 0; k < 6; k += 3) {
        cfg.rows[k] = 16, cfg.colsb[k] = 64;
        cfg.rows[k + 1] = 16, cfg.colsb[k + 1] = 32;
        cfg.rows[k + 2] = 8, cfg.colsb[k + 2] = 64;
    }
    _tile_loadconfig(&cfg);
}

// A paired format's rows' values for the group of blocks g..g+nj, unpacked to block order:
// a[j][m] = row m's block g + j (32 unsigned bytes).
template <int FMT>
inline void unpack_group(const uint8_t* w, int64_t rb, const RowLayout& L, int64_t g, int64_t nj,
                         uint8_t (*a)[TILE_ROWS][32]) {
    for (int64_t m = 0; m < TILE_ROWS; ++m)
        for (int64_t j = 0; j < nj; j += 2) {
            __m256i lo, hi;                         // [A 0:16 | B 0:16], [A 16:32 | B 16:32]
            pair_values<FMT>(w + m * rb, L, g + j, lo, hi);
            _mm256_store_si256(reinterpret_cast<__m256i*>(a[j][m]), _mm256_permute2x128_si256(lo, hi, 0x20));
            if (j + 1 < nj)
                _mm256_store_si256(reinterpret_cast<__m256i*>(a[j + 1][m]), _mm256_permute2x128_si256(lo, hi, 0x31));
        }
}

// hsum (simd.h) of eight lanes, for 16 tokens at once: (c0 + c1) + (c2 + c3), c_i = l_i + l_(i+4).
inline __m512 hsum8(const float (*l)[16]) {
    __m512 c[4];
    for (int i = 0; i < 4; ++i) c[i] = _mm512_add_ps(_mm512_load_ps(l[i]), _mm512_load_ps(l[i + 4]));
    return _mm512_add_ps(_mm512_add_ps(c[0], c[1]), _mm512_add_ps(c[2], c[3]));
}

// out[m * os + t] = w_m . x[16 G + t] for 16 rows (w_m at w + m * rb) and the T <= 16 tokens of
// token group G of xt.
template <int FMT>
inline void tile16(const uint8_t* w, int64_t rb, const XTiles& xt, int64_t G, int T, float* out, int64_t os) {
    using F = Traits<FMT>;
    constexpr bool MIN = F::min_factor != 0.0f;
    const int64_t nb = xt.nb;
    const RowLayout L = row_layout(FMT, nb);
    alignas(64) float acc[TILE_ROWS][8][16];       // row, lane, token
    alignas(64) float accm[MIN ? TILE_ROWS : 1][8][16];
    alignas(64) int32_t c[2][TILE_ROWS][16];
    alignas(64) uint8_t a[8][TILE_ROWS][32];
    alignas(32) float dws[TILE_ROWS][8], mws[TILE_ROWS][8];
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t g = 0; g < nb; g += 8) {
        const int64_t nj = nb - g < 8 ? nb - g : 8;
        // The first group starts the lanes from +0 (fma(a, b, +0), as from a zeroed lane); lanes
        // no block reaches (nb < 8) stay +0.
        const auto lane = [&](const float* l) { return g == 0 ? zero : _mm512_load_ps(l); };
        if (g == 0)
            for (int64_t m = 0; m < TILE_ROWS; ++m)
                for (int64_t j = nj; j < 8; ++j) {
                    _mm512_store_ps(acc[m][j], zero);
                    if constexpr (MIN) _mm512_store_ps(accm[m][j], zero);
                }
        for (int64_t m = 0; m < TILE_ROWS; ++m) {
            __m256 dw, mw;
            group_scales<FMT>(w + m * rb, L, g, dw, mw);
            _mm256_store_ps(dws[m], dw);
            _mm256_store_ps(mws[m], mw);
        }
        const int64_t xb = G * nb + g;             // the group's first block in xt
        if constexpr (MIN)
            for (int64_t j = 0; j < nj; ++j) {
                const __m512 s = _mm512_loadu_ps(xt.s + (xb + j) * 16);
                for (int64_t m = 0; m < TILE_ROWS; ++m)
                    _mm512_store_ps(accm[m][j], _mm512_fmadd_ps(_mm512_set1_ps(mws[m][j]), s, lane(accm[m][j])));
            }
        if constexpr (F::paired) unpack_group<FMT>(w, rb, L, g, nj, a);
        const auto fixup = [&](int64_t j, const int32_t (*cj)[16]) {     // acc lane j += d_w d_x C
            const __m512 dx = _mm512_loadu_ps(xt.d + (xb + j) * 16);
            for (int64_t m = 0; m < TILE_ROWS; ++m) {
                const __m512 sc = _mm512_mul_ps(_mm512_set1_ps(dws[m][j]), dx);
                const __m512 tot = _mm512_cvtepi32_ps(_mm512_load_si512(cj[m]));
                _mm512_store_ps(acc[m][j], _mm512_fmadd_ps(sc, tot, lane(acc[m][j])));
            }
        };
        int64_t j = 0;
        for (; j + 2 <= nj; j += 2) {
            _tile_zero(0);
            _tile_zero(3);
            if constexpr (FMT == FMT_Q8_0) {
                _tile_loadd(1, w + L.q + 32 * (g + j), rb);
                _tile_loadd(4, w + L.q + 32 * (g + j + 1), rb);
            } else {
                _tile_loadd(1, a[j], 32);
                _tile_loadd(4, a[j + 1], 32);
            }
            _tile_loadd(2, xt.q + (xb + j) * 512, 64);
            _tile_loadd(5, xt.q + (xb + j + 1) * 512, 64);
            if constexpr (FMT == FMT_Q8_0) {
                _tile_dpbssd(0, 1, 2);
                _tile_dpbssd(3, 4, 5);
            } else {
                _tile_dpbusd(0, 1, 2);
                _tile_dpbusd(3, 4, 5);
            }
            _tile_stored(0, c[0], 64);
            _tile_stored(3, c[1], 64);
            fixup(j, c[0]);
            fixup(j + 1, c[1]);
        }
        if (j < nj) {
            _tile_zero(0);
            if constexpr (FMT == FMT_Q8_0) _tile_loadd(1, w + L.q + 32 * (g + j), rb);
            else _tile_loadd(1, a[j], 32);
            _tile_loadd(2, xt.q + (xb + j) * 512, 64);
            if constexpr (FMT == FMT_Q8_0) _tile_dpbssd(0, 1, 2);
            else _tile_dpbusd(0, 1, 2);
            _tile_stored(0, c[0], 64);
            fixup(j, c[0]);
        }
    }
    for (int64_t m = 0; m < TILE_ROWS; ++m) {
        alignas(64) float v[16];
        _mm512_store_ps(v, hsum8(acc[m]));
        if constexpr (MIN)   // factor is a power of two: factor hsum(accm) is exact (quant.h's finish)
            _mm512_store_ps(v, _mm512_add_ps(_mm512_load_ps(v), _mm512_mul_ps(_mm512_set1_ps(F::min_factor), hsum8(accm[m]))));
        std::memcpy(out + m * os, v, sizeof(float) * static_cast<size_t>(T));
    }
}

// R rows (a multiple of 16) against token group G of xt: out[r * os + t], t < T.
inline void qrows_tiles(int fmt, const uint8_t* w, int64_t rb, int64_t R, const XTiles& xt, int64_t G, int T,
                        float* out, int64_t os) {
    load_tile_config();                     // once a call: callers pass many rows at once
    for (int64_t r = 0; r < R; r += TILE_ROWS) {
        const uint8_t* wr = w + r * rb;
        float* o = out + r * os;
        switch (fmt) {
            case FMT_Q8_0: tile16<FMT_Q8_0>(wr, rb, xt, G, T, o, os); break;
            case FMT_Q4_0: tile16<FMT_Q4_0>(wr, rb, xt, G, T, o, os); break;
            case FMT_Q4_1: tile16<FMT_Q4_1>(wr, rb, xt, G, T, o, os); break;
            case FMT_Q5_0: tile16<FMT_Q5_0>(wr, rb, xt, G, T, o, os); break;
            case FMT_Q4_K: tile16<FMT_Q4_K>(wr, rb, xt, G, T, o, os); break;
            default: tile16<FMT_Q5_K>(wr, rb, xt, G, T, o, os); break;
        }
    }
    _tile_release();
}

}  // namespace PF_ISA
}  // namespace pf_cpu
#endif
