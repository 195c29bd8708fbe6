// 16-bit float weights (FMT_F16, FMT_BF16): rows of d_in values as stored, dotted with fp32
// activations (no activation quantization: the products are fp32 FMAs of the exact weights).
// A bf16 W's calls of many tokens take AMX-BF16 tiles instead where the CPU has them (amx_bf16.h).
// Header-only, no checks; compiled per instruction set like quant.h (namespace PF_ISA, isa.h):
// the baseline with AVX2/FMA/F16C on 8 lanes, the avx512vnni variant on 16 (__AVX512F__).
//
//   f16   IEEE half:  w = _cvtsh_ss(bits)
//   bf16  the upper half of a float32:  w = float(bits << 16)
//
//   hrows_dots(fmt, w, rb, R, x, xs, T, d, out, os)  out[r os + t] = w_r . x[t]   (d % 8 == 0)
//   half_row(fmt, w, d, out)                         a row -> d floats
//
// Both widths add the same products in the same order per lane: the 8-lane tile keeps two
// accumulators, values k..k+7 of every 16 in the first and k+8..k+15 in the second, and the
// 16-lane tile one accumulator whose low and high halves are exactly those two; the tail of 8
// goes to the first (the low half), and the result is hsum(first + second) in both.  So the
// variants' outputs are bit-identical (tests/test_isa.py).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "quant_format.h"
#include "simd.h"

namespace pf_cpu {
namespace PF_ISA {

// Eight weights at p as floats.
template <int FMT>
inline __m256 load_half8(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (FMT == FMT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

#if defined(__AVX512F__)
// Sixteen weights at p as floats.
template <int FMT>
inline __m512 load_half16(const uint16_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    if constexpr (FMT == FMT_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// The 16-lane htile (the file's comment: the same sums as the 8-lane one, bit for bit).
template <int FMT, int NR, int NT>
inline void htile(const uint8_t* w, int64_t rb, const float* x, int64_t xs, int64_t d, float* out, int64_t os) {
    __m512 acc[NR][NT];
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= d; k += 16) {
        __m512 xv[NT];
        for (int t = 0; t < NT; ++t) xv[t] = _mm512_loadu_ps(x + t * xs + k);
        for (int r = 0; r < NR; ++r) {
            const __m512 wv = load_half16<FMT>(reinterpret_cast<const uint16_t*>(w + r * rb) + k);
            for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    if (k < d) {                                     // 8 left: the low half only
        for (int r = 0; r < NR; ++r) {
            const __m256 wv = load_half8<FMT>(reinterpret_cast<const uint16_t*>(w + r * rb) + k);
            for (int t = 0; t < NT; ++t) {
                const __m256 lo = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + t * xs + k), _mm512_castps512_ps256(acc[r][t]));
                acc[r][t] = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(acc[r][t]), _mm256_castps_pd(lo), 0));
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t)
            out[r * os + t] = hsum(_mm256_add_ps(_mm512_castps512_ps256(acc[r][t]),
                                                 _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[r][t]), 1))));
}

// Rows per tile: one token a row at a time (the prefetcher), more 4 rows x 4 tokens (32 zmm).
constexpr int kHalfRows = 4;
#else
// out[r * os + t] = w_r . x[t] for NR rows (row stride rb bytes) and NT tokens (stride xs floats).
// Two accumulators per (row, token), alternating by 8 values: the FMA chains are half as long.
// One row at a time at decode, as the rows stream in order (measured on a DRAM-resident
// 46080 x 576 matrix, one token: 18 GB/s one row at a time, 12 GB/s four rows at a time with a
// software prefetch); hrows_dots_fmt asks for the row 4 KB ahead (simd.h's prefetch_bytes).
template <int FMT, int NR, int NT>
inline void htile(const uint8_t* w, int64_t rb, const float* x, int64_t xs, int64_t d, float* out, int64_t os) {
    __m256 acc[2][NR][NT];
    for (int h = 0; h < 2; ++h)
        for (int r = 0; r < NR; ++r)
            for (int t = 0; t < NT; ++t) acc[h][r][t] = _mm256_setzero_ps();
    const auto step = [&](int64_t k, int h) {
        __m256 xv[NT];
        for (int t = 0; t < NT; ++t) xv[t] = _mm256_loadu_ps(x + t * xs + k);
        for (int r = 0; r < NR; ++r) {
            const __m256 wv = load_half8<FMT>(reinterpret_cast<const uint16_t*>(w + r * rb) + k);
            for (int t = 0; t < NT; ++t) acc[h][r][t] = _mm256_fmadd_ps(wv, xv[t], acc[h][r][t]);
        }
    };
    int64_t k = 0;
    for (; k + 16 <= d; k += 16) {
        step(k, 0);
        step(k + 8, 1);
    }
    if (k < d) step(k, 0);
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) out[r * os + t] = hsum(_mm256_add_ps(acc[0][r][t], acc[1][r][t]));
}

constexpr int kHalfRows = 2;   // rows per tile with more than one token (16 ymm registers)
#endif

// NR rows against all T tokens, NT tokens at a time.
template <int FMT, int NR, int NT>
inline void hrows_fmt(const uint8_t* w, int64_t rb, const float* x, int64_t xs, int T, int64_t d, float* out,
                      int64_t os) {
    int t = 0;
    for (; t + NT <= T; t += NT) htile<FMT, NR, NT>(w, rb, x + t * xs, xs, d, out + t, os);
    for (; t < T; ++t) htile<FMT, NR, 1>(w, rb, x + t * xs, xs, d, out + t, os);
}

// One token: a row at a time (see htile), the row kAheadBytes on asked for first (simd.h); more:
// kHalfRows rows x 4 tokens.
template <int FMT>
inline void hrows_dots_fmt(const uint8_t* w, int64_t rb, int64_t R, const float* x, int64_t xs, int T, int64_t d,
                           float* out, int64_t os) {
    int64_t r = 0;
    if (T == 1) {
        for (; r + 1 <= R; r += 1) {
            prefetch_bytes(w + r * rb + kAheadBytes, rb);
            hrows_fmt<FMT, 1, 1>(w + r * rb, rb, x, xs, T, d, out + r * os, os);
        }
    } else {
        for (; r + kHalfRows <= R; r += kHalfRows)
            hrows_fmt<FMT, kHalfRows, 4>(w + r * rb, rb, x, xs, T, d, out + r * os, os);
    }
    for (; r < R; ++r) hrows_fmt<FMT, 1, 4>(w + r * rb, rb, x, xs, T, d, out + r * os, os);
}

inline void hrows_dots(int fmt, const uint8_t* w, int64_t rb, int64_t R, const float* x, int64_t xs, int T,
                       int64_t d, float* out, int64_t os) {
    if (fmt == FMT_F16) hrows_dots_fmt<FMT_F16>(w, rb, R, x, xs, T, d, out, os);
    else hrows_dots_fmt<FMT_BF16>(w, rb, R, x, xs, T, d, out, os);
}

inline void half_row(int fmt, const uint8_t* w, int64_t d, float* out) {
    const uint16_t* p = reinterpret_cast<const uint16_t*>(w);
    for (int64_t k = 0; k < d; k += 8)
        _mm256_storeu_ps(out + k, fmt == FMT_F16 ? load_half8<FMT_F16>(p + k) : load_half8<FMT_BF16>(p + k));
}

}  // namespace PF_ISA
using namespace PF_ISA;
}  // namespace pf_cpu
