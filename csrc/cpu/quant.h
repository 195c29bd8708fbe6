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
// Every path sums a block's integer products exactly first (its total), then scales it: the
// vector tiles here (Fold) and amx.h's tiles give the same bits, whatever the instruction set, the
// tile or the number of tokens (tests/test_isa.py).
//
// For Q4 the activation's values are stored pairwise to match the nibbles: blocks 2p, 2p + 1
// (A, B) as [A 0:16, B 0:16, A 16:32, B 16:32], so that a pair's 32 nibble bytes give
// (n & 15) = [A 0:16 | B 0:16] and (n >> 4) = [A 16:32 | B 16:32], each one maddubs.
//
// Q5_0 and the K-quants (pf_kernels/quant_pack.py has their GGUF blocks and repacked rows) use
// the same dots: Q5_0 is Q4_0 with a fifth bit per value (words in pair order) and - 16 d_w s_x;
// a K super-block of 256 values is one group of eight blocks, so Q4_K / Q5_K are Q4_1 (Q5: with
// the fifth bit) whose d_w = d sc_b and m_w = - dmin m_b come from integer block scales; Q6_K
// (unpaired) sums (u - 32) q_x per 16 values times its int8 scales in integers, times d d_x.
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

inline __m256 load_u8x8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

inline __m256i load32(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

// 0x10 in byte i where bit i of the 32-bit word at p is set (Q5's fifth bit), else 0: a masked
// move with AVX-512 BW/VL, a byte shuffle and compare on AVX2 (the same bytes).
inline __m256i fifth_bits(const uint8_t* p) {
    uint32_t bits;
    std::memcpy(&bits, p, 4);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    return _mm256_maskz_mov_epi8(static_cast<__mmask32>(bits), _mm256_set1_epi8(0x10));
#endif
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(bits)),
        _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
    const __m256i others = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));   // all bits but i % 8
    return _mm256_and_si256(_mm256_cmpeq_epi8(others, _mm256_set1_epi8(-1)), _mm256_set1_epi8(0x10));
}

// What a format's tile does (the table at the top): paired nibbles, a fifth bit, super-blocks, and
// the factor of the per-block term m_w s_x in w . x (0: none).
template <int FMT>
struct Traits {
    static constexpr bool paired = FMT == FMT_Q4_0 || FMT == FMT_Q4_1 || FMT == FMT_Q5_0 || FMT == FMT_Q4_K ||
                                   FMT == FMT_Q5_K;
    static constexpr bool fifth = FMT == FMT_Q5_0 || FMT == FMT_Q5_K;
    static constexpr bool super = FMT == FMT_Q4_K || FMT == FMT_Q5_K || FMT == FMT_Q6_K;
    static constexpr float min_factor = FMT == FMT_Q4_0 ? -8.0f : FMT == FMT_Q5_0 ? -16.0f
                                      : FMT == FMT_Q4_1 ? 1.0f : (FMT == FMT_Q4_K || FMT == FMT_Q5_K) ? -1.0f : 0.0f;
    static constexpr int64_t group_q_bytes = FMT == FMT_Q8_0 ? 256 : FMT == FMT_Q6_K ? 192 : 128;
};

// A row's scales d_w for the eight blocks g..g+8 (Q6_K: the super-block's d; its 16-value
// scales come in q6_dot) and the per-block term's m_w.
template <int FMT>
inline void group_scales(const uint8_t* wr, const RowLayout& L, int64_t g, __m256& dw, __m256& mw) {
    if constexpr (Traits<FMT>::super) {
        const int64_t s = g / 8;
        dw = _mm256_set1_ps(f16(wr + L.d + 2 * s));
        if constexpr (FMT != FMT_Q6_K) {
            mw = _mm256_mul_ps(_mm256_set1_ps(f16(wr + L.m + 2 * s)), load_u8x8(wr + L.mn + g));
            dw = _mm256_mul_ps(dw, load_u8x8(wr + L.sc + g));
        }
    } else {
        dw = load_f16x8(wr + L.d + 2 * g);
        mw = FMT == FMT_Q4_1 ? load_f16x8(wr + L.m + 2 * g) : dw;
    }
}

// A paired format's blocks b, b + 1 (b even): values [A 0:16 | B 0:16] and [A 16:32 | B 16:32].
template <int FMT>
inline void pair_values(const uint8_t* wr, const RowLayout& L, int64_t b, __m256i& lo, __m256i& hi) {
    const __m256i raw = load32(wr + L.q + 16 * b), m4 = _mm256_set1_epi8(0x0f);
    lo = _mm256_and_si256(raw, m4);
    hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
    if constexpr (Traits<FMT>::fifth) {                  // the pair's two words of fifth bits
        lo = _mm256_or_si256(lo, fifth_bits(wr + L.h + 4 * b));
        hi = _mm256_or_si256(hi, fifth_bits(wr + L.h + 4 * b + 4));
    }
}

// Q6_K's block j of the super-block at sb (its ql [128], qh [64]): its 32 values u = q + 32 in
// 0..63 (GGUF's order, kept: ql's low then high nibbles, two bits each from qh).  Called with j
// a constant (the tile's unrolled loop), so that the shifts and the choice of nibble fold.
inline __m256i q6_values(const uint8_t* sb, int j) {
    const int half = j / 4, k = j % 4;
    const __m256i ql = load32(sb + 64 * half + 32 * (k & 1)), m4 = _mm256_set1_epi8(0x0f);
    const __m256i nib = k < 2 ? _mm256_and_si256(ql, m4) : _mm256_and_si256(_mm256_srli_epi16(ql, 4), m4);
    const __m256i qh = load32(sb + 128 + 32 * half);
    const __m256i hb = k == 0 ? _mm256_slli_epi16(qh, 4) : k == 1 ? _mm256_slli_epi16(qh, 2)
                     : k == 2 ? qh : _mm256_srli_epi16(qh, 2);
    return _mm256_or_si256(nib, _mm256_and_si256(hb, _mm256_set1_epi8(0x30)));
}

// The int16 scales of Q6_K's block j from the super-block's sixteen (s16: int16 lanes 0..15):
// lanes 0-7 its first sixteen values' scale, 8-15 its second's.
inline __m256i q6_block_scales(__m256i s16, int j) {
    const __m256i pair = _mm256_permutevar8x32_epi32(s16, _mm256_set1_epi32(j));   // (s_2j, s_2j+1) x 8
    return _mm256_shuffle_epi8(pair, _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                                      2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3));
}

// Q6_K: sum over a block of (u - 32) q_x, scaled per 16 values (sc16: int16 lanes 0-7 the first
// sixteen's scale, 8-15 the second's), in 8 int32 lanes; x32 = maddubs(32, q_x).  The same integer
// arithmetic on every instruction set, never saturating: maddubs(u, q_x) <= 2 * 63 * 127 and the
// difference 2 * 32 * 127 in magnitude.
inline __m256i q6_dot(__m256i u, __m256i qx, __m256i x32, __m256i sc16) {
    return _mm256_madd_epi16(_mm256_sub_epi16(_mm256_maddubs_epi16(u, qx), x32), sc16);
}

// How far ahead a tile prefetches: the same group of its rows kAhead tiles later (the rows a
// caller walks next).  DRAM-resident weights (the LM head) read at about twice the rate with it.
constexpr int64_t kAhead = 4;

// A dot's float from its lanes: hsum(acc) (+ factor hsum(accm)), the one expression every path ends
// with (amx.h too).
template <bool MIN>
inline float finish(__m256 acc, __m256 accm, float factor) {
    float v = hsum(acc);
    if constexpr (MIN) v += factor * hsum(accm);
    return v;
}

// Block totals: a block's integer dot arrives spread over 8 int32 lanes; eight blocks' lanes fold
// into one vector whose lane j is block j's total (integers: exact in any order).  Unpaired
// formats give one vector per block (fold8: blocks 0..7 in turn); paired ones one per pair, lanes
// 0-3 its first block and 4-7 its second (fold4: pairs 0..3 in turn).  Called with the position a
// constant (unrolled loops): the branches fold.  A missing block or pair folds in as zero.
struct Fold {
    __m256i pend, h01, q0;

    // Block j (0..7) of the group; returns true with ``total`` set after the eighth.
    bool fold8(int j, __m256i p, __m256i& total) {
        if (j % 2 == 0) { pend = p; return false; }
        const __m256i h = _mm256_hadd_epi32(pend, p);       // [pj-1 01, 23, pj 01, 23 | 45, 67, 45, 67]
        if (j == 1 || j == 5) { h01 = h; return false; }
        const __m256i q = _mm256_hadd_epi32(h01, h);        // [b0 lo, b1 lo, b2 lo, b3 lo | b0 hi, ..]
        if (j == 3) { q0 = q; return false; }
        total = _mm256_add_epi32(_mm256_permute2x128_si256(q0, q, 0x20), _mm256_permute2x128_si256(q0, q, 0x31));
        return true;
    }

    // Pair i (0..3) of the group (blocks 2i, 2i + 1); true with ``total`` after the fourth.
    bool fold4(int i, __m256i p, __m256i& total) {
        if (i % 2 == 0) { pend = p; return false; }
        const __m256i h = _mm256_hadd_epi32(pend, p);
        if (i == 1) { h01 = h; return false; }
        const __m256i q = _mm256_hadd_epi32(h01, h);         // [b0, b2, b4, b6 | b1, b3, b5, b7]
        total = _mm256_permutevar8x32_epi32(q, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        return true;
    }
};

// out[r * os + t] = w_r . x[t] for NR weight rows (w_r at w + r * rb) and NT tokens X[t * xs].
//
// Each block's dot is its integer total (Fold) times d_w d_x: eight accumulator lanes, lane j the
// sum over groups of block 8g + j's term in order (one FMA per group), then hsum; the per-block
// term m_w s_x likewise in its own lanes, added last times the format's factor.  amx.h computes the
// same totals with tiles and the same float operations in the same order: the same bits.
template <int FMT, int NR, int NT>
inline void qtile(const uint8_t* w, int64_t rb, const XRow* X, int64_t xs, int64_t nb, float* out, int64_t os) {
    using F = Traits<FMT>;
    constexpr bool MIN = F::min_factor != 0.0f;
    const RowLayout L = row_layout(FMT, nb);
    __m256 acc[NR][NT], accm[NR][NT];
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) acc[r][t] = accm[r][t] = _mm256_setzero_ps();
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t g = 0; g < nb; g += 8) {
        const int64_t nj = nb - g < 8 ? nb - g : 8;           // blocks in this group
        __m256 dw[NR];                                       // d_w of the group's 8 blocks
        for (int r = 0; r < NR; ++r) {
            const uint8_t* wr = w + r * rb;
            __m256 mw;
            group_scales<FMT>(wr, L, g, dw[r], mw);
            if constexpr (MIN)
                for (int t = 0; t < NT; ++t) accm[r][t] = _mm256_fmadd_ps(mw, _mm256_loadu_ps(X[t * xs].s + g), accm[r][t]);
            const uint8_t* q = wr + L.q + F::group_q_bytes * g / 8;
            for (int k = 0; k < F::group_q_bytes / 64; ++k)     // the same group, kAhead tiles on
                _mm_prefetch(reinterpret_cast<const char*>(q + kAhead * NR * rb + 64 * k), _MM_HINT_T0);
        }
        Fold fold[NR][NT];
        __m256i total;
        const auto add = [&](int r, int t, __m256i tot) {
            const __m256 sc = _mm256_mul_ps(dw[r], _mm256_loadu_ps(X[t * xs].d + g));   // d_w d_x
            acc[r][t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(tot), acc[r][t]);
        };
        // Block (pair) by block, every row in turn.
        if constexpr (F::paired) {
#pragma GCC unroll 4
            for (int i = 0; i < 4; ++i) {                        // a pair of blocks: 32 bytes a row
                const int64_t j = 2 * i;
                __m256i xl[NT], xh[NT];
                if (j < nj)
                    for (int t = 0; t < NT; ++t) {
                        const int8_t* xq = X[t * xs].q + (g + j) * QK;
                        xl[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
                        xh[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + QK));
                    }
                for (int r = 0; r < NR; ++r) {
                    __m256i lo, hi;
                    if (j < nj) pair_values<FMT>(w + r * rb, L, g + j, lo, hi);
                    for (int t = 0; t < NT; ++t)
                        if (fold[r][t].fold4(i, j < nj ? dot_q4(lo, xl[t], hi, xh[t]) : zero, total)) add(r, t, total);
                }
            }
        } else if constexpr (FMT == FMT_Q6_K) {               // a whole super-block: j constant
            __m256i s16[NR];
            for (int r = 0; r < NR; ++r)
                s16[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * rb + L.sc + 2 * g)));
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) {
                __m256i qx[NT], x32[NT];
                for (int t = 0; t < NT; ++t) {
                    qx[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X[t * xs].q + (g + j) * QK));
                    x32[t] = _mm256_maddubs_epi16(_mm256_set1_epi8(32), qx[t]);
                }
                for (int r = 0; r < NR; ++r) {
                    const __m256i u = q6_values(w + r * rb + L.q + 24 * g, j), sc16 = q6_block_scales(s16[r], j);
                    for (int t = 0; t < NT; ++t)
                        if (fold[r][t].fold8(j, q6_dot(u, qx[t], x32[t], sc16), total)) add(r, t, total);
                }
            }
        } else {
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) {                        // Q8_0
                __m256i qx[NT];
                if (j < nj)
                    for (int t = 0; t < NT; ++t)
                        qx[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X[t * xs].q + (g + j) * QK));
                for (int r = 0; r < NR; ++r) {
                    __m256i qw = zero, aw = zero;
                    if (j < nj) {
                        qw = load32(w + r * rb + L.q + 32 * (g + j));
                        aw = _mm256_sign_epi8(qw, qw);
                    }
                    for (int t = 0; t < NT; ++t)
                        if (fold[r][t].fold8(j, j < nj ? dot_q8(aw, _mm256_sign_epi8(qx[t], qw)) : zero, total))
                            add(r, t, total);
                }
            }
        }
    }
    for (int r = 0; r < NR; ++r)
        for (int t = 0; t < NT; ++t) out[r * os + t] = finish<MIN>(acc[r][t], accm[r][t], F::min_factor);
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
    // One token: one weight row at a time, every format.  Four rows at once (independent
    // accumulator chains) read DRAM-resident rows at 0.6-0.8x the rate (measured on a Zen 4,
    // 2 threads, 35-60 MB matrices: q4_1 24 -> 37 GB/s, q5_0 22 -> 35, q6_k 22 -> 26 one row at a
    // time; q8_0 was already).  More tokens: kQRows x kQTokens tiles.
    int64_t r = 0;
    if (T > 1)
        for (; r + kQRows <= R; r += kQRows) qrows_fmt<FMT, kQRows, kQTokens>(w + r * rb, rb, X, T, nb, out + r * os, os);
    for (; r < R; ++r) qrows_fmt<FMT, 1, 2>(w + r * rb, rb, X, T, nb, out + r * os, os);
}

// out[r * os + t] = w_r . x[t] for R repacked weight rows of fmt at stride rb bytes and T tokens.
inline void qrows_dots(int fmt, const uint8_t* w, int64_t rb, int64_t R, const XRow* X, int T, int64_t nb,
                       float* out, int64_t os) {
    switch (fmt) {
        case FMT_Q8_0: return qrows_dots_fmt<FMT_Q8_0>(w, rb, R, X, T, nb, out, os);
        case FMT_Q4_0: return qrows_dots_fmt<FMT_Q4_0>(w, rb, R, X, T, nb, out, os);
        case FMT_Q4_1: return qrows_dots_fmt<FMT_Q4_1>(w, rb, R, X, T, nb, out, os);
        case FMT_Q5_0: return qrows_dots_fmt<FMT_Q5_0>(w, rb, R, X, T, nb, out, os);
        case FMT_Q4_K: return qrows_dots_fmt<FMT_Q4_K>(w, rb, R, X, T, nb, out, os);
        case FMT_Q5_K: return qrows_dots_fmt<FMT_Q5_K>(w, rb, R, X, T, nb, out, os);
        default: return qrows_dots_fmt<FMT_Q6_K>(w, rb, R, X, T, nb, out, os);
    }
}

// One repacked row of fmt -> nb * 32 floats, block by block: w = d_w u + m_w for the unsigned
// values u of the block (in order), or d_w (u - 32) per 16 values for Q6_K.
template <int FMT>
inline void dequantize_row_fmt(const uint8_t* w, int64_t nb, float* out) {
    using F = Traits<FMT>;
    const RowLayout L = row_layout(FMT, nb);
    alignas(32) float dws[8], mws[8];
    for (int64_t g = 0; g < nb; g += 8) {
        __m256 dw, mw = _mm256_setzero_ps();
        group_scales<FMT>(w, L, g, dw, mw);
        if constexpr (FMT == FMT_Q4_0 || FMT == FMT_Q5_0) mw = _mm256_mul_ps(dw, _mm256_set1_ps(F::min_factor));
        if constexpr (FMT == FMT_Q4_K || FMT == FMT_Q5_K) mw = _mm256_sub_ps(_mm256_setzero_ps(), mw);
        _mm256_store_ps(dws, dw);
        _mm256_store_ps(mws, mw);
        const int64_t nj = nb - g < 8 ? nb - g : 8;
        for (int64_t j = 0; j < nj; ++j) {
            alignas(32) uint8_t u[32];
            const int64_t b = g + j;
            if constexpr (F::paired) {              // this block's half of its pair, in order
                __m256i lo, hi;
                pair_values<FMT>(w, L, b - b % 2, lo, hi);
                const int off = static_cast<int>(b % 2) * 16;
                alignas(32) uint8_t l[32], h[32];
                _mm256_store_si256(reinterpret_cast<__m256i*>(l), lo);
                _mm256_store_si256(reinterpret_cast<__m256i*>(h), hi);
                std::memcpy(u, l + off, 16);
                std::memcpy(u + 16, h + off, 16);
            } else if constexpr (FMT == FMT_Q6_K) {
                _mm256_store_si256(reinterpret_cast<__m256i*>(u), q6_values(w + L.q + 24 * g, static_cast<int>(j)));
            } else {
                _mm256_store_si256(reinterpret_cast<__m256i*>(u), load32(w + L.q + 32 * b));
            }
            float* o = out + b * QK;
            if constexpr (FMT == FMT_Q8_0) {
                for (int i = 0; i < 32; ++i) o[i] = dws[j] * static_cast<float>(static_cast<int8_t>(u[i]));
            } else if constexpr (FMT == FMT_Q6_K) {
                const int8_t* s16 = reinterpret_cast<const int8_t*>(w + L.sc) + 2 * b;
                for (int i = 0; i < 32; ++i)
                    o[i] = dws[j] * static_cast<float>(s16[i / 16]) * static_cast<float>(static_cast<int>(u[i]) - 32);
            } else {
                for (int i = 0; i < 32; ++i) o[i] = dws[j] * static_cast<float>(u[i]) + mws[j];
            }
        }
    }
}

inline void dequantize_row(int fmt, const uint8_t* w, int64_t nb, float* out) {
    switch (fmt) {
        case FMT_Q8_0: return dequantize_row_fmt<FMT_Q8_0>(w, nb, out);
        case FMT_Q4_0: return dequantize_row_fmt<FMT_Q4_0>(w, nb, out);
        case FMT_Q4_1: return dequantize_row_fmt<FMT_Q4_1>(w, nb, out);
        case FMT_Q5_0: return dequantize_row_fmt<FMT_Q5_0>(w, nb, out);
        case FMT_Q4_K: return dequantize_row_fmt<FMT_Q4_K>(w, nb, out);
        case FMT_Q5_K: return dequantize_row_fmt<FMT_Q5_K>(w, nb, out);
        default: return dequantize_row_fmt<FMT_Q6_K>(w, nb, out);
    }
}

}  // namespace PF_ISA
using namespace PF_ISA;
}  // namespace pf_cpu
