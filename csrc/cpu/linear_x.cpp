// linear_x.h: a LinearPlan call's activations for its dots.
#include "linear_x.h"

#include <immintrin.h>

#include "kernels.h"
#include "quant.h"

namespace pf_cpu {

const float* prologue(const Linear& lin, const LinearCall& c, std::vector<float>& buf, int64_t& xs) {
    xs = c.xs;
    if (c.prologue == PRO_NONE) return c.x;
    buf.resize(static_cast<size_t>(c.T * lin.d_in));
    for (int64_t t = 0; t < c.T; ++t) {
        float* out = buf.data() + t * lin.d_in;
        if (c.prologue == PRO_RMSNORM) rmsnorm_row(c.x + t * c.xs, c.norm, lin.d_in, c.eps, out);
        else silu_mul_row(c.x + t * c.xs, lin.d_in, out);
    }
    xs = lin.d_in;
    return buf.data();
}

const XRow* quantize_rows(const float* x, int64_t xs, int64_t T, int64_t nb, bool pairs, std::vector<float>& buf,
                          std::vector<XRow>& rows) {
    const int64_t per = xrow_floats(nb);
    if (buf.size() < static_cast<size_t>(T * per)) buf.resize(static_cast<size_t>(T * per));
    rows.resize(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) {
        rows[t] = xrow_at(buf.data() + t * per, nb);
        quantize_x(x + t * xs, nb, pairs, rows[t]);
    }
    return rows.data();
}

XTiles pack_tiles(const XRow* X, int64_t T, int64_t nb, bool pairs, std::vector<int32_t>& q, std::vector<float>& d,
                  std::vector<float>& s) {
    const int64_t ng = (T + TILE_ROWS - 1) / TILE_ROWS;
    q.assign(static_cast<size_t>(ng * nb * 128), 0);
    d.assign(static_cast<size_t>(ng * nb * TILE_ROWS), 0.0f);
    s.assign(static_cast<size_t>(ng * nb * TILE_ROWS), 0.0f);
    for (int64_t t = 0; t < T; ++t) {
        const int64_t G = t / TILE_ROWS, n = t % TILE_ROWS;
        const int32_t* words = reinterpret_cast<const int32_t*>(X[t].q);   // 8 words a block
        for (int64_t b = 0; b < nb; ++b) {
            int32_t* dst = q.data() + (G * nb + b) * 128 + n;
            const int64_t f = G * nb + b;
            d[f * TILE_ROWS + n] = X[t].d[b];
            s[f * TILE_ROWS + n] = X[t].s[b];
            for (int k = 0; k < 8; ++k) {           // word k of the block in block order
                // pairs: block 2p's words are the pair's 0-3 and 8-11, block 2p + 1's 4-7 and 12-15
                const int64_t src = pairs ? (b / 2) * 16 + (b % 2) * 4 + (k % 4) + (k / 4) * 8 : b * 8 + k;
                dst[k * TILE_ROWS] = words[src];
            }
        }
    }
    return {reinterpret_cast<const int8_t*>(q.data()), d.data(), s.data(), nb};
}

namespace {

// 8 floats rounded to the nearest bf16, ties to even (gguf's rounding; a NaN stays a NaN, quieted),
// each in the low half of its 32-bit lane.
inline __m256i bf16_rne8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i near = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    return _mm256_blendv_epi8(near, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
}

}  // namespace

// 16 values at a time: rounded, packed to 8 pair words (value 2p in word p's low half), each
// word to its B tile row (stride 16 words: one per token of the group).
const uint16_t* pack_htiles(const float* x, int64_t xs, int64_t T, int64_t d, std::vector<uint16_t>& out) {
    const int64_t nk = d / 32;
    out.assign(static_cast<size_t>((T + TILE_ROWS - 1) / TILE_ROWS * nk * 512), 0);
    uint32_t* words = reinterpret_cast<uint32_t*>(out.data());       // (G nk + k / 32) 256 + p 16 + n
    for (int64_t t = 0; t < T; ++t) {
        const float* xt = x + t * xs;
        uint32_t* g = words + (t / TILE_ROWS) * nk * 256 + t % TILE_ROWS;
        for (int64_t k = 0; k < d; k += 16) {
            const __m256i h = _mm256_packus_epi32(bf16_rne8(_mm256_loadu_ps(xt + k)), bf16_rne8(_mm256_loadu_ps(xt + k + 8)));
            alignas(32) uint32_t w[8];
            _mm256_store_si256(reinterpret_cast<__m256i*>(w), _mm256_permute4x64_epi64(h, 0xD8));
            uint32_t* dst = g + (k / 32) * 256 + ((k % 32) / 2) * TILE_ROWS;
            for (int p = 0; p < 8; ++p) dst[p * TILE_ROWS] = w[p];
        }
    }
    return out.data();
}

}  // namespace pf_cpu
