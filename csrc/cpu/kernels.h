// The inner loops every csrc/cpu kernel shares (AVX2/FMA, fp32), header-only so that each caller
// inlines them.  No threads, no checks: callers pass valid pointers and sizes.
//
//   row_dots(w, x, xs, T, d, out)   out[t] = w . x[t]            T rows of x at row stride xs
//   rows_dots<NW>(w, ws, x, xs, T, d, out, os)   out[r os + t] = w[r] . x[t], r < NW: the same bits
//   dot(a, b, D)                    a . b
//   rope(x, c, s, D, out)           out[d] = x[d] c[d] + x[(d + D/2) mod D] s[d]   (D even)
//   rmsnorm_row(x, w, d, eps, out)  out[k] = w[k] * (x[k] / sqrt(mean(x^2) + eps))
//   silu_mul_row(x, d, out)         out[k] = silu(x[k]) * x[d + k]                 (x: 2 d floats)
//   axpy(a, x, n, y)                y[k] += a * x[k]
//   axpy4(a, x, xs, n, y)           y[k] += a[0] x[k] + a[1] x[xs + k] + a[2] x[2 xs + k] + a[3] x[3 xs + k]
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>

#include "simd.h"

namespace pf_cpu {

// out[j] = w . x[j] for j < NT (NT rows of x at stride xs), d elements.
template <int NT>
inline void dots(const float* w, const float* x, int64_t xs, int d, float* out) {
    __m256 acc[NT];
    for (int j = 0; j < NT; ++j) acc[j] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= d; k += 8) {
        __m256 wv = _mm256_loadu_ps(w + k);
        for (int j = 0; j < NT; ++j) acc[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + j * xs + k), acc[j]);
    }
    for (int j = 0; j < NT; ++j) {
        float s = hsum(acc[j]);
        for (int kk = k; kk < d; ++kk) s += w[kk] * x[j * xs + kk];
        out[j] = s;
    }
}

// out[r * os + j] = w[r] . x[j] for r < NW (rows of w at stride ws), j < NT (rows of x at stride
// xs): a register block of NW x NT sums, each summed exactly as dots<NT> sums it (the same FMAs
// in the same order, the same horizontal sum and tail), so a sum has the same bits in any block.
// Per 8 columns: NW + NT loads for NW NT FMAs (NW + 1 + NW NT registers: 16 at 3 x 4).
template <int NW, int NT>
inline void dots_block(const float* w, int64_t ws, const float* x, int64_t xs, int d, float* out, int64_t os) {
    __m256 acc[NW][NT];
    for (int r = 0; r < NW; ++r)
        for (int j = 0; j < NT; ++j) acc[r][j] = _mm256_setzero_ps();
    int k = 0;
    for (; k + 8 <= d; k += 8) {
        __m256 wv[NW];
        for (int r = 0; r < NW; ++r) wv[r] = _mm256_loadu_ps(w + r * ws + k);
        for (int j = 0; j < NT; ++j) {
            const __m256 xv = _mm256_loadu_ps(x + j * xs + k);
            for (int r = 0; r < NW; ++r) acc[r][j] = _mm256_fmadd_ps(wv[r], xv, acc[r][j]);
        }
    }
    for (int r = 0; r < NW; ++r)
        for (int j = 0; j < NT; ++j) {
            float s = hsum(acc[r][j]);
            for (int kk = k; kk < d; ++kk) s += w[r * ws + kk] * x[j * xs + kk];
            out[r * os + j] = s;
        }
}

// out[r * os + t] = w[r] . x[t] for r < NW, all T rows: blocks of NW x 4, then the rest of T.
template <int NW>
inline void rows_dots(const float* w, int64_t ws, const float* x, int64_t xs, int T, int d, float* out, int64_t os) {
    int t = 0;
    for (; t + 4 <= T; t += 4) dots_block<NW, 4>(w, ws, x + t * xs, xs, d, out + t, os);
    switch (T - t) {
        case 3: dots_block<NW, 3>(w, ws, x + t * xs, xs, d, out + t, os); break;
        case 2: dots_block<NW, 2>(w, ws, x + t * xs, xs, d, out + t, os); break;
        case 1: dots_block<NW, 1>(w, ws, x + t * xs, xs, d, out + t, os); break;
        default: break;
    }
}

// w . x as dots<1> sums it (the same FMAs in the same order: the same bits), asking for the
// weights kAheadBytes ahead as it goes, one cache line per 16 values (fp32 decode).
inline float dot_ahead(const float* w, const float* x, int d) {
    __m256 acc = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= d; k += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(w + k) + kAheadBytes, _MM_HINT_T0);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), acc);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), acc);
    }
    for (; k + 8 <= d; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), acc);
    float s = hsum(acc);
    for (; k < d; ++k) s += w[k] * x[k];
    return s;
}

// out[t] = w . x[t] for all T rows (chunks of 4 rows: 4 accumulators, w read from L1 again).
inline void row_dots(const float* w, const float* x, int64_t xs, int T, int d, float* out) {
    int t = 0;
    for (; t + 4 <= T; t += 4) dots<4>(w, x + t * xs, xs, d, out + t);
    switch (T - t) {
        case 3: dots<3>(w, x + t * xs, xs, d, out + t); break;
        case 2: dots<2>(w, x + t * xs, xs, d, out + t); break;
        case 1: dots<1>(w, x + t * xs, xs, d, out + t); break;
        default: break;
    }
}

inline float dot(const float* a, const float* b, int64_t D) {
    __m256 acc = _mm256_setzero_ps();
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
    float r = hsum(acc);
    for (; d < D; ++d) r += a[d] * b[d];
    return r;
}

inline void rope(const float* x, const float* c, const float* s, int64_t D, float* out) {
    const int64_t half = D / 2;
    for (int64_t d = 0; d < D; ++d) out[d] = x[d] * c[d] + x[d < half ? d + half : d - half] * s[d];
}

inline void rmsnorm_row(const float* x, const float* w, int64_t d, float eps, float* out) {
    __m256 acc = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= d; k += 8) { __m256 v = _mm256_loadu_ps(x + k); acc = _mm256_fmadd_ps(v, v, acc); }
    float ss = hsum(acc);
    for (; k < d; ++k) ss += x[k] * x[k];
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
    for (k = 0; k < d; ++k) out[k] = w[k] * (x[k] * inv);
}

inline void silu_mul_row(const float* x, int64_t d, float* out) {
    for (int64_t k = 0; k < d; ++k) {
        const float g = x[k];
        out[k] = g / (1.0f + std::exp(-g)) * x[d + k];
    }
}

inline void axpy(float a, const float* x, int64_t n, float* y) {
    const __m256 av = _mm256_set1_ps(a);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8)
        _mm256_storeu_ps(y + k, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + k), _mm256_loadu_ps(y + k)));
    for (; k < n; ++k) y[k] += a * x[k];
}

// Four rows of x (row stride xs) into y: one load and store of y for four FMAs.
inline void axpy4(const float* a, const float* x, int64_t xs, int64_t n, float* y) {
    const __m256 a0 = _mm256_set1_ps(a[0]), a1 = _mm256_set1_ps(a[1]);
    const __m256 a2 = _mm256_set1_ps(a[2]), a3 = _mm256_set1_ps(a[3]);
    const float *x0 = x, *x1 = x + xs, *x2 = x + 2 * xs, *x3 = x + 3 * xs;
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 v = _mm256_loadu_ps(y + k);
        v = _mm256_fmadd_ps(a0, _mm256_loadu_ps(x0 + k), v);
        v = _mm256_fmadd_ps(a1, _mm256_loadu_ps(x1 + k), v);
        v = _mm256_fmadd_ps(a2, _mm256_loadu_ps(x2 + k), v);
        v = _mm256_fmadd_ps(a3, _mm256_loadu_ps(x3 + k), v);
        _mm256_storeu_ps(y + k, v);
    }
    for (; k < n; ++k) y[k] += a[0] * x0[k] + a[1] * x1[k] + a[2] * x2[k] + a[3] * x3[k];
}

}  // namespace pf_cpu
