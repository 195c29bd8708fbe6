// attention_run: attention.h's RoPE + KV write + GQA attention on the pool (pool.h).
#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "pool.h"

namespace pf_cpu {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Query head i of row b: chunk b * H + i.
void head(const AttentionCall& c, int64_t chunk) {
    thread_local std::vector<float> buf;                       // q [D], acc [D], s [L]
    const int64_t D = c.D, L = c.L;
    if (buf.size() < static_cast<size_t>(2 * D + L)) buf.resize(static_cast<size_t>(2 * D + L));
    float* q = buf.data();
    float* acc = q + D;
    float* s = acc + D;
    const int64_t b = chunk / c.H, i = chunk % c.H, h = i / (c.H / c.H_kv), nh = c.H + c.H_kv;
    rope(c.qkv + b * c.qs + i * D, c.cos + (b * nh + i) * D, c.sin + (b * nh + i) * D, D, q);
    const int64_t at = (slot_of(c, b) * c.H_kv + h) * c.max_len * D;
    const float* K = c.k + at;
    const float* V = c.v + at;
    const float* bias = c.bias + b * c.bs;
    float m = kNegInf;
    for (int64_t j = 0; j < L; ++j) {
        s[j] = bias[j] == kNegInf ? kNegInf : dot(q, K + j * D, D) + bias[j];
        m = std::max(m, s[j]);
    }
    float total = 0.0f;
    std::fill(acc, acc + D, 0.0f);
    for (int64_t j = 0; j < L; ++j) {
        if (s[j] == kNegInf) continue;
        const float p = std::exp(s[j] - m);
        total += p;
        axpy(p, V + j * D, D, acc);
    }
    float* o = c.out + b * c.H * D + i * D;
    const float inv = 1.0f / total;
    for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
}

}  // namespace

void attention_run(const AttentionCall& c, int threads) {
    const int64_t D = c.D, nh = c.H + c.H_kv;
    for (int64_t b = 0; b < c.B; ++b) {                         // 1. rope(k), write k and v
        const float* row = c.qkv + b * c.qs;
        for (int64_t h = 0; h < c.H_kv; ++h) {
            const int64_t at = ((slot_of(c, b) * c.H_kv + h) * c.max_len + c.cols[b]) * D;
            rope(row + (c.H + h) * D, c.cos + (b * nh + c.H + h) * D, c.sin + (b * nh + c.H + h) * D,
                 D, c.k + at);
            std::copy(row + (c.H + c.H_kv + h) * D, row + (c.H + c.H_kv + h + 1) * D, c.v + at);
        }
    }
    parallel_for(c.B * c.H, threads, [&c](int64_t chunk) { head(c, chunk); });   // 2. the heads
}

}  // namespace pf_cpu
