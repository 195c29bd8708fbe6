// 16-bit float weights (FMT_F16, FMT_BF16): rows of d_in values as stored, dotted with fp32
// activations (no activation quantization: the products are fp32 FMAs of the exact weights).
// Header-only (AVX2/FMA/F16C), no checks.
//
//   f16   IEEE half:  w = _cvtsh_ss(bits)
//   bf16  the upper half of a float32:  w = float(bits << 16)
//
//   hrows_dots(fmt, w, rb, R, x, xs, T, d, out, os)  out[r os + t] = w_r . x[t]   (d % 8 == 0)
//   half_row(fmt, w, d, out)                         a row -> d floats
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "quant_format.h"
#include "simd.h"

namespace pf_cpu {

// Eight weights at p as floats.
template <int FMT>
inline __m256 load_half8(const uint16_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if constexpr (FMT == FMT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// out[r * os + t] = w_r . x[t] for NR rows (row stride rb bytes) and NT tokens (stride xs floats).
template <int FMT, int NR, int NT>
inline void htile(const uint8_t* w, int64_t rb, const float* x, int64_t xs, int64_t d, float* out, int64_t os) {
    __m256 acc[NR][NT];
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_ps();
    for (int64_t k = 0; k < d; k += 8) {
        __m256 xv[NT];
        for (int t = 0; t < NT; ++t) xv[t] = _mm256_loadu_ps(x + t * xs + k);
        for (int r = 0; r < NR; ++r) {
            const uint16_t* wr = reinterpret_cast<const uint16_t*>(w + r * rb);
            if (k % 32 == 0) _mm_prefetch(reinterpret_cast<const char*>(wr + k) + 4 * NR * rb, _MM_HINT_T0);
            const __m256 wv = load_half8<FMT>(wr + k);
            for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_fmadd_ps(wv, xv[t], acc[r][t]);
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) out[r * os + t] = hsum(acc[r][t]);
}

// NR rows against all T tokens, NT tokens at a time.
template <int FMT, int NR, int NT>
inline void hrows_fmt(const uint8_t* w, int64_t rb, const float* x, int64_t xs, int T, int64_t d, float* out,
                      int64_t os) {
    int t = 0;
    for (; t + NT <= T; t += NT) htile<FMT, NR, NT>(w, rb, x + t * xs, xs, d, out + t, os);
    for (; t < T; ++t) htile<FMT, NR, 1>(w, rb, x + t * xs, xs, d, out + t, os);
}

// One token: four rows at once (independent accumulator chains); more: 2 rows x 4 tokens.
template <int FMT>
inline void hrows_dots_fmt(const uint8_t* w, int64_t rb, int64_t R, const float* x, int64_t xs, int T, int64_t d,
                           float* out, int64_t os) {
    int64_t r = 0;
    if (T == 1) {
        for (; r + 4 <= R; r += 4) hrows_fmt<FMT, 4, 1>(w + r * rb, rb, x, xs, T, d, out + r * os, os);
    } else {
        for (; r + 2 <= R; r += 2) hrows_fmt<FMT, 2, 4>(w + r * rb, rb, x, xs, T, d, out + r * os, os);
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

}  // namespace pf_cpu
