// Block-quantized weights: their dot products against quantized activations, and dequantization.
// Header-only inner loops (AVX2/FMA/F16C, and VNNI where the translation unit is compiled for it:
// namespace PF_ISA, isa.h), like kernels.h; no checks.  The formats themselves: quant_format.h.
//
// A weight row of d_in = nb * 32 values is nb blocks of 32 with GGUF's block values
// (pf_kernels/quant.py):
//
//   FMT_Q8_0  fp16 d, int8 q[32]                    w[j] = d q[j]
//   FMT_Q4_0  fp16 d, uint8 n[16]                   w[j] = d (u[j] - 8)
//   FMT_Q4_1  fp16 d, fp16 m, uint8 n[16]           w[j] = d u[j] + m
//
// with u[j] = n[j] & 15 and u[j + 16] = n[j] >> 4 (j < 16), repacked at load from GGUF's array
// of blocks into an array of each field, so that eight blocks' scales load and convert as one
// vector and two Q4 blocks' nibbles as one 32-byte load (RowLayout; nb8 = nb rounded up to 8,
// nb2 = nb rounded up to 2, padding zero):
//
//   Q8_0  d fp16 [nb8] | q [nb][32]
//   Q4_0  d fp16 [nb8] | n [nb2][16]
//   Q4_1  d fp16 [nb8] | m fp16 [nb8] | n [nb2][16]
//
// An activation row x [d_in] is quantized per block for every format (XRow: d = max|x| / 127,
// q = round(x / d) ties away from zero, s = d sum q, as llama.cpp's Q8_1), and a block's dot
// product is integer arithmetic:
//
//   Q8_0  w . x = d_w d_x sum q_w q_x
//   Q4_0  w . x = d_w d_x sum u q_x - 8 d_w s_x
//   Q4_1  w . x = d_w d_x sum u q_x + m_w s_x
//
// For Q4 the activation's values are stored pairwise to match the nibbles: blocks 2p, 2p + 1
// (A, B) as [A 0:16, B 0:16, A 16:32, B 16:32], so that a pair's 32 nibble bytes give
// (n & 15) = [A 0:16 | B 0:16] and (n >> 4) = [A 16:32 | B 16:32], each one maddubs.
//
//   quantize_x(x, nb, pairs, X)                   x [nb * 32] -> X (one token's XRow)
//   qrows_dots(fmt, w, rb, R, X, xs, T, nb, out, os)  out[r os + t] = w_r . x[t]
//   dequantize_row(fmt, w, nb, out)               a repacked row -> nb * 32 floats
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "quant_format.h"
#include "simd.h"

namespace pf_cpu {
namespace PF_ISA {

inline float f16(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

// x [nb * 32] -> X (round half away from zero, as llama.cpp's roundf); ``pairs``: Q4 order.
inline void quantize_x(const float* x, int64_t nb, bool pairs, const XRow& X) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const int64_t n8 = round_up(nb, 8);
    for (int64_t b = nb; b < n8; ++b) X.d[b] = X.s[b] = 0.0f;
    if (nb % 2) std::memset(X.q + nb * QK, 0, QK);
    for (int64_t b = 0; b < nb; ++b, x += QK) {
        __m256 v[4], amax = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
            v[i] = _mm256_loadu_ps(x + 8 * i);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        }
        __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        m = _mm_max_ss(m, _mm_movehdup_ps(m));
        const float mx = _mm_cvtss_f32(m);
        const float d = mx / 127.0f, id = mx > 0.0f ? 127.0f / mx : 0.0f;
        const __m256 idv = _mm256_set1_ps(id), half = _mm256_set1_ps(0.5f);
        __m256i qi[4];
        for (int i = 0; i < 4; ++i) {
            const __m256 s = _mm256_mul_ps(v[i], idv);
            const __m256 r = _mm256_round_ps(_mm256_add_ps(s, _mm256_or_ps(_mm256_and_ps(s, sign), half)),
                                             _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            qi[i] = _mm256_cvtps_epi32(r);
        }
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));   // values in order
        if (pairs) {                       // [A 0:16 | B 0:16 | A 16:32 | B 16:32] for pair b / 2
            int8_t* pair = X.q + (b / 2) * 2 * QK + (b % 2) * 16;
            _mm_storeu_si128(reinterpret_cast<__m128i*>(pair), _mm256_castsi256_si128(p));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(pair + QK), _mm256_extracti128_si256(p, 1));
        } else {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(X.q + b * QK), p);
        }
        const __m256i s16 = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(1), p),
                                              _mm256_set1_epi16(1));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s16), _mm256_extracti128_si256(s16, 1));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
        s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
        X.d[b] = d;
        X.s[b] = d * static_cast<float>(_mm_cvtsi128_si32(s4));
    }
}

inline __m256i pair_sums(__m256i p16) { return _mm256_madd_epi16(p16, _mm256_set1_epi16(1)); }

// The integer dots of a block, into 8 int32 lanes (lane k: bytes 4k..4k+3 of each operand pair;
// u unsigned, s signed), compiled per instruction set (isa.h): one vpdpbusd per operand pair
// with VNNI, maddubs + madd on AVX2.  Equal lane by lane: every pair of products is at most
// 2 * 127 * 127 < 2^15 for Q8_0 (|q| <= 127) and 4 * 15 * 127 for Q4, so maddubs never
// saturates.
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, pair_sums(_mm256_maddubs_epi16(u, s)));
#endif
}

// Q8_0: sum over a block of |w| * (x signed like w) = sum w x, in 8 lanes.
inline __m256i dot_q8(__m256i aw, __m256i sx) {
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
    return dpbusd(_mm256_setzero_si256(), aw, sx);
#else
    return pair_sums(_mm256_maddubs_epi16(aw, sx));
#endif
}

// Q4: lo . xl + hi . xh for a pair of blocks' nibbles, in 8 lanes (int16 sums of
// 4 products of <= 15 * 127 each before the madd on AVX2: no overflow).
inline __m256i dot_q4(__m256i lo, __m256i xl, __m256i hi, __m256i xh) {
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
    return dpbusd(dpbusd(_mm256_setzero_si256(), lo, xl), hi, xh);
#else
    return pair_sums(_mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)));
#endif
}

inline __m256 load_f16x8(const uint8_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// How far ahead a tile prefetches: the same group of its rows kAhead tiles later (the rows a
// caller walks next).  DRAM-resident weights (the LM head) read at about twice the rate with it.
constexpr int64_t kAhead = 4;

// out[r * os + t] = w_r . x[t] for NR weight rows (w_r at w + r * rb) and NT tokens X[t * xs].
template <int FMT, int NR, int NT>
inline void qtile(const uint8_t* w, int64_t rb, const XRow* X, int64_t xs, int64_t nb, float* out, int64_t os) {
    constexpr bool Q4 = FMT != FMT_Q8_0;
    const RowLayout L = row_layout(FMT, nb);
    __m256 acc[NR][NT], accm[NR][NT];
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = accm[r][t] = _mm256_setzero_ps();
    for (int64_t g = 0; g < nb; g += 8) {
        const int64_t nj = nb - g < 8 ? nb - g : 8;           // blocks in this group
        __m256 sc[NR][NT];                                   // d_w d_x of the group's 8 blocks
        for (int r = 0; r < NR; ++r) {
            const uint8_t* wr = w + r * rb;
            const __m256 dw = load_f16x8(wr + L.d + 2 * g);
            const __m256 mw = FMT == FMT_Q4_1 ? load_f16x8(wr + L.m + 2 * g) : dw;
            for (int t = 0; t < NT; ++t) {
                const XRow& x = X[t * xs];
                sc[r][t] = _mm256_mul_ps(dw, _mm256_loadu_ps(x.d + g));
                if constexpr (Q4) accm[r][t] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(x.s + g), accm[r][t]);
            }
            const uint8_t* q = wr + L.q + (Q4 ? 16 : 32) * g;   // 128 / 256 bytes per group
            for (int k = 0; k < (Q4 ? 2 : 4); ++k)          // the same group, kAhead tiles on
                _mm_prefetch(reinterpret_cast<const char*>(q + kAhead * NR * rb + 64 * k), _MM_HINT_T0);
        }
        // Block (pair) by block, every row in turn: consecutive FMAs feed different accumulators.
        if constexpr (Q4) {
            for (int64_t j = 0; j < nj; j += 2) {                // a pair of blocks: 32 bytes a row
                __m256i xl[NT], xh[NT];
                for (int t = 0; t < NT; ++t) {
                    const int8_t* xq = X[t * xs].q + (g + j) * QK;
                    xl[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
                    xh[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + QK));
                }
                const __m256i idx = _mm256_setr_epi32(j, j, j, j, j + 1, j + 1, j + 1, j + 1);
                for (int r = 0; r < NR; ++r) {
                    const __m256i raw = _mm256_loadu_si256(
                        reinterpret_cast<const __m256i*>(w + r * rb + L.q + 16 * (g + j)));
                    const __m256i lo = _mm256_and_si256(raw, _mm256_set1_epi8(0x0f));
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), _mm256_set1_epi8(0x0f));
                    for (int t = 0; t < NT; ++t) {
                        const __m256i p = dot_q4(lo, xl[t], hi, xh[t]);
                        acc[r][t] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(sc[r][t], idx),
                                                    _mm256_cvtepi32_ps(p), acc[r][t]);
                    }
                }
            }
        } else {
            for (int64_t j = 0; j < nj; ++j) {
                __m256i qx[NT];
                for (int t = 0; t < NT; ++t)
                    qx[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X[t * xs].q + (g + j) * QK));
                const __m256i idx = _mm256_set1_epi32(static_cast<int>(j));
                for (int r = 0; r < NR; ++r) {
                    const __m256i qw = _mm256_loadu_si256(
                        reinterpret_cast<const __m256i*>(w + r * rb + L.q + 32 * (g + j)));
                    const __m256i aw = _mm256_sign_epi8(qw, qw);
                    for (int t = 0; t < NT; ++t) {
                        const __m256i p = dot_q8(aw, _mm256_sign_epi8(qx[t], qw));
                        acc[r][t] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(sc[r][t], idx),
                                                    _mm256_cvtepi32_ps(p), acc[r][t]);
                    }
                }
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) {
            float v = hsum(acc[r][t]);
            if constexpr (FMT == FMT_Q4_1) v += hsum(accm[r][t]);
            if constexpr (FMT == FMT_Q4_0) v -= 8.0f * hsum(accm[r][t]);
            out[r * os + t] = v;
        }
}

// NR weight rows against all T tokens, in tiles of up to NT tokens.
template <int FMT, int NR, int NT>
inline void qrows_fmt(const uint8_t* w, int64_t rb, const XRow* X, int T, int64_t nb, float* out, int64_t os) {
    int t = 0;
    for (; t + NT <= T; t += NT) qtile<FMT, NR, NT>(w, rb, X + t, 1, nb, out + t, os);
    for (; t < T; ++t) qtile<FMT, NR, 1>(w, rb, X + t, 1, nb, out + t, os);
}

// Tiles for more than one token (each (row, token) sum is computed alone: any tile gives the same
// bits).  With AVX-512's 32 registers 2 x 4 (measured: q8_0 prefill ~1.05-1.2x 2 x 2's; 4 x 2
// slower); AVX2's 16 hold 2 x 2.
#if defined(__AVX512F__)
constexpr int kQRows = 2, kQTokens = 4;
#else
constexpr int kQRows = 2, kQTokens = 2;
#endif

template <int FMT>
inline void qrows_dots_fmt(const uint8_t* w, int64_t rb, int64_t R, const XRow* X, int T, int64_t nb,
                           float* out, int64_t os) {
    // One token: four weight rows at once (independent accumulator chains); more: kQRows x kQTokens.
    int64_t r = 0;
    if (T == 1) {
        if (FMT != FMT_Q8_0)    // q8_0 rows stream better one at a time (measured: ~1.5x)
            for (; r + 4 <= R; r += 4) qrows_fmt<FMT, 4, 1>(w + r * rb, rb, X, T, nb, out + r * os, os);
    } else {
        for (; r + kQRows <= R; r += kQRows) qrows_fmt<FMT, kQRows, kQTokens>(w + r * rb, rb, X, T, nb, out + r * os, os);
    }
    for (; r < R; ++r) qrows_fmt<FMT, 1, 2>(w + r * rb, rb, X, T, nb, out + r * os, os);
}

// out[r * os + t] = w_r . x[t] for R repacked weight rows of fmt at stride rb bytes and T tokens.
inline void qrows_dots(int fmt, const uint8_t* w, int64_t rb, int64_t R, const XRow* X, int T, int64_t nb,
                       float* out, int64_t os) {
    switch (fmt) {
        case FMT_Q8_0: return qrows_dots_fmt<FMT_Q8_0>(w, rb, R, X, T, nb, out, os);
        case FMT_Q4_0: return qrows_dots_fmt<FMT_Q4_0>(w, rb, R, X, T, nb, out, os);
        default: return qrows_dots_fmt<FMT_Q4_1>(w, rb, R, X, T, nb, out, os);
    }
}

// One repacked row of fmt -> nb * 32 floats.
inline void dequantize_row(int fmt, const uint8_t* w, int64_t nb, float* out) {
    const RowLayout L = row_layout(fmt, nb);
    for (int64_t b = 0; b < nb; ++b, out += QK) {
        const __m256 dv = _mm256_set1_ps(f16(w + L.d + 2 * b));
        if (fmt == FMT_Q8_0) {
            const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + L.q + 32 * b));
            for (int i = 0; i < 4; ++i) {
                const __m128i q8 = i < 2 ? _mm256_castsi256_si128(q) : _mm256_extracti128_si256(q, 1);
                const __m128i part = (i & 1) ? _mm_srli_si128(q8, 8) : q8;
                _mm256_storeu_ps(out + 8 * i, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part))));
            }
        } else {
            const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + L.q + 16 * b));
            const __m128i m4 = _mm_set1_epi8(0x0f);
            const __m128i lo = _mm_and_si128(raw, m4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m4);
            const __m256 mv = fmt == FMT_Q4_1 ? _mm256_set1_ps(f16(w + L.m + 2 * b))
                                              : _mm256_mul_ps(dv, _mm256_set1_ps(-8.0f));
            const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int i = 0; i < 4; ++i)
                _mm256_storeu_ps(out + 8 * i, _mm256_fmadd_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[i])), mv));
        }
    }
}

}  // namespace PF_ISA
using namespace PF_ISA;
}  // namespace pf_cpu
