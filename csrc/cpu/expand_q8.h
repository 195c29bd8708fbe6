// The q8 experts' expand (expert.h's panels) for one instruction set: integer dots of B's 8-bit
// panels against h quantized per token and block, compiled per variant of isa.h like quant.h.
//
// For an active block a (one expert's n rank rows in one part; nq = ceil(n / 4)), its panel group
// g holds columns 8g..8g+7 of the part as an fp32 scale s_g and nq quads of 32 int8 values
// (quad k, column i: B[8g + i, 4k..4k+3]), and token t's h[t, r] (already gated and scaled) as
// int8 hq with scale sh[t, a] (hq = round(h / sh), sh = max|h| / 127, zero padded to 4 nq):
//
//   y[t, 8g + i] += s_g sh[t, a] sum_{k < nq} sum_{j < 4} q[g, k, i, j] hq[t, 4k + j]
//
// added block after block in fp32 (one fused multiply-add per block and 8 columns), so every
// variant gives the same bits: the integer sums are exact (|sum| <= 2 nq * 2 * 127^2 < 2^24 for
// ranks up to 1040).  One quad is one vpdpbusd (VNNI) or maddubs + madd (AVX2) over |q| and
// hq signed like q, as quant.h's q8_0 dots (no int16 overflow: pairs of 127 * 127).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "quant.h"

namespace pf_cpu {
namespace PF_ISA {

inline void expand_q8(const PanelBlock* blk, int nblk, int64_t g0, int64_t g1, const int32_t* hw, int64_t hws,
                      const float* sh, int64_t shs, int T, float* y, int64_t ys, int64_t valid) {
    for (int64_t g = g0; g < g1; ++g) {
        const int64_t c = 8 * g, n = std::min<int64_t>(8, valid - c);
        for (int t = 0; t < T; ++t) {
            float* yt = y + t * ys + c;
            float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            if (n < 8) std::memcpy(tail, yt, sizeof(float) * n);
            __m256 v = _mm256_loadu_ps(n < 8 ? tail : yt);
            for (int a = 0; a < nblk; ++a) {
                const PanelBlock& b = blk[a];
                const uint8_t* p = b.panel + g * b.gstride;
                const int32_t* h = hw + t * hws + b.hoff;
                __m256i acc = _mm256_setzero_si256();
                for (int64_t k = 0; k < b.nq; ++k) {
                    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 4 + 32 * k));
                    acc = dpbusd(acc, _mm256_sign_epi8(w, w), _mm256_sign_epi8(_mm256_set1_epi32(h[k]), w));
                }
                float s;
                std::memcpy(&s, p, sizeof s);
                v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), _mm256_set1_ps(s * sh[t * shs + a]), v);
            }
            if (n < 8) {
                _mm256_storeu_ps(tail, v);
                std::memcpy(yt, tail, sizeof(float) * n);
            } else {
                _mm256_storeu_ps(yt, v);
            }
        }
    }
}

}  // namespace PF_ISA
}  // namespace pf_cpu
