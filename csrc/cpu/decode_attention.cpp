// One decode step's attention for B rows on CPU (fp32, AVX2/FMA, OpenMP): RoPE, the KV-cache
// write and grouped-query attention in one call, in place of ~15 small torch ops per layer.
//
// Row b (slot row0 + b of the pool) has one new token whose projections are
// qkv[b] = [q_0 .. q_{H-1} | k_0 .. k_{H_kv-1} | v_0 .. v_{H_kv-1}], each head D floats.
//   1. k_h <- rope(k_h), written with v_h at column cols[b] of the slot's cache, per kv head h:
//        rope(x)[d] = x[d] cos[b, i, d] + x[(d + D/2) mod D] sin[b, i, d]
//      (cos / sin [B, H + H_kv, D] from model.Rotary.tables: sin carries rotate_half's sign, the
//      q heads' rows carry the 1/sqrt(D) scale);
//   2. for each query head i (kv head h = i / (H / H_kv)):
//        s_j = rope(q_i) . K[h, j] + bias[b, j]    j < L     (bias: 0 or -inf, the mask)
//        out[b, i] = sum_j softmax(s)_j V[h, j]
// Cache: k / v of one layer, [slots, H_kv, max_len, D] with strides s_slot, s_head, D, 1.
// out [B, H * D] contiguous.  Parallel over (row, query head) after the writes.
#include <immintrin.h>
#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "kernels.h"

namespace py = pybind11;

namespace {

using pf_cpu::dot;
using pf_cpu::ptr;
using pf_cpu::rope;

}  // namespace

void decode_attention(uintptr_t qkv_p, int64_t B, int64_t qkv_s, int64_t H, int64_t H_kv, int64_t D,
                      uintptr_t cos_p, uintptr_t sin_p, uintptr_t k_p, uintptr_t v_p,
                      int64_t s_slot, int64_t s_head, int64_t row0, uintptr_t cols_p, int64_t L,
                      uintptr_t bias_p, int64_t bias_s, uintptr_t out_p, int64_t threads) {
    if (B < 1 || H < 1 || H_kv < 1 || H % H_kv != 0 || D < 2 || D % 2 != 0 || L < 1)
        throw std::invalid_argument("decode_attention: bad sizes");
    const float* qkv = ptr<const float>(qkv_p);
    const float* cs = ptr<const float>(cos_p);
    const float* sn = ptr<const float>(sin_p);
    float* kc = ptr<float>(k_p);
    float* vc = ptr<float>(v_p);
    const int64_t* cols = ptr<const int64_t>(cols_p);
    const float* bias = ptr<const float>(bias_p);
    float* out = ptr<float>(out_p);
    const int64_t nh = H + H_kv, group = H / H_kv;
    for (int64_t b = 0; b < B; ++b)
        if (cols[b] < 0 || cols[b] >= L) throw std::invalid_argument("decode_attention: a column outside [0, L)");

    py::gil_scoped_release release;
    #pragma omp parallel num_threads(static_cast<int>(threads))
    {
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H_kv; ++bh) {            // 1. rope(k), write k and v
            const int64_t b = bh / H_kv, h = bh % H_kv;
            const float* row = qkv + b * qkv_s;
            const int64_t at = (row0 + b) * s_slot + h * s_head + cols[b] * D;
            rope(row + (H + h) * D, cs + (b * nh + H + h) * D, sn + (b * nh + H + h) * D, D, kc + at);
            std::copy(row + (H + H_kv + h) * D, row + (H + H_kv + h + 1) * D, vc + at);
        }
        std::vector<float> q(static_cast<size_t>(D)), s(static_cast<size_t>(L)), acc(static_cast<size_t>(D));
        #pragma omp for schedule(static)
        for (int64_t bi = 0; bi < B * H; ++bi) {               // 2. attention per query head
            const int64_t b = bi / H, i = bi % H, h = i / group;
            rope(qkv + b * qkv_s + i * D, cs + (b * nh + i) * D, sn + (b * nh + i) * D, D, q.data());
            const float* K = kc + (row0 + b) * s_slot + h * s_head;
            const float* V = vc + (row0 + b) * s_slot + h * s_head;
            const float* bb = bias + b * bias_s;
            float m = -std::numeric_limits<float>::infinity();
            for (int64_t j = 0; j < L; ++j) {
                s[j] = bb[j] == -std::numeric_limits<float>::infinity() ? bb[j] : dot(q.data(), K + j * D, D) + bb[j];
                m = std::max(m, s[j]);
            }
            float total = 0.0f;
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t j = 0; j < L; ++j) {
                if (s[j] == -std::numeric_limits<float>::infinity()) continue;
                const float p = std::exp(s[j] - m);
                total += p;
                const float* vj = V + j * D;
                for (int64_t d = 0; d < D; ++d) acc[d] += p * vj[d];
            }
            float* o = out + b * H * D + i * D;
            const float inv = 1.0f / total;
            for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
        }
    }
}
