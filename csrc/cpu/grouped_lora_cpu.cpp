// Fused grouped-LoRA linear for CPU decode steps (AVX2/FMA, OpenMP), fp32: the OLD raw-pointer
// entry points (fused_linear, fused_linear_pe), kept until the engine uses the typed API
// (LinearPlan, BlockPlan: linear_plan.cpp, block_plan.cpp, binding.cpp).
//
// For N token rows x [N, d_in] (N small: one decode step) and one projection group (q|k|v,
// gate|up, o, down) with experts stacked as W_aug = [W; A_cat] ([d_out + R, d_in], row-major):
//
//   y[t, o] = W[o] . x[t] + bias[o] + sum over active blocks j of o's part:
//             sum_{r in j} B_p[o - out0_p, r - r0_p] * h[t, r]
//   h[t, r] = (A_cat[r] . x[t]) * g[t, e_j] * s_j                     for r in block j
//
// A block j is one expert's rank rows in one part (projection); it is active when its expert's
// gate is nonzero for some row t.  Pass 1 streams the d_out rows of W and the active blocks' rows
// of A_cat once (parallel over rows); pass 2 adds the expand, streaming the active rank rows of
// B^T across each thread's share of the output columns.  Inactive experts cost nothing: they are skipped by
// the routing metadata, not by gathering copies.  Scratch buffers are reused across calls.
//
// fused_linear_pe adds what a decode block needs around the GEMVs (pf_engine/cpu_decode.py): a
// prologue on x (the RMS norm, or silu(gate) * up) computed once into a scratch row before
// pass 1, and a residual added to y in pass 1.  fused_linear is fused_linear_pe without them.
//
// Metadata (built once per Linear in Python, pf_engine/backends.py):
//   parts  int64 [P, 6]: out0, out1, r0, r1 (the part's rows of A_cat), block_start, block_end
//   bptrs  int64 [P]: address of each part's B^T [r1 - r0, out1 - out0] (row-major, contiguous:
//          pass 2 streams the active rank rows across output columns)
//   blocks int64 [J, 3]: expert, r0, r1 (absolute rows of A_cat);  scale fp32 [J]
#include <immintrin.h>
#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <vector>

#include "kernels.h"
#include "legacy.h"

namespace py = pybind11;

// csrc/cpu/decode_attention.cpp
void decode_attention(uintptr_t qkv_p, int64_t B, int64_t qkv_s, int64_t H, int64_t H_kv, int64_t D,
                      uintptr_t cos_p, uintptr_t sin_p, uintptr_t k_p, uintptr_t v_p,
                      int64_t s_slot, int64_t s_head, int64_t row0, uintptr_t cols_p, int64_t L,
                      uintptr_t bias_p, int64_t bias_s, uintptr_t out_p, int64_t threads);

namespace {

using pf_cpu::ptr;
using pf_cpu::row_dots;

struct ActiveRow { int64_t r; int64_t expert; float scale; };
struct Chunk { int64_t part, c, a0, a1; };   // a part, its first column in pass 2's concatenation, active blocks a0:a1

}  // namespace

// The input the GEMVs read: x itself, or a prologue of it written into ``buf`` [T, d_in]:
//   PRO_RMSNORM  buf[t] = (x[t] / sqrt(mean(x[t]^2) + eps)) * pw          (the block's norms)
//   PRO_SILU_MUL buf[t, k] = silu(x[t, k]) * x[t, d_in + k]  (x [T, 2 d_in]: gate | up)
enum Prologue : int64_t { PRO_NONE = 0, PRO_RMSNORM = 1, PRO_SILU_MUL = 2 };

static const float* apply_prologue(int64_t pro, const float* x, int64_t& xs, int64_t T, int64_t d_in,
                            const float* pw, float eps, std::vector<float>& buf) {
    if (pro == PRO_NONE) return x;
    buf.resize(static_cast<size_t>(T * d_in));
    for (int64_t t = 0; t < T; ++t) {
        if (pro == PRO_RMSNORM) pf_cpu::rmsnorm_row(x + t * xs, pw, d_in, eps, buf.data() + t * d_in);
        else pf_cpu::silu_mul_row(x + t * xs, d_in, buf.data() + t * d_in);
    }
    xs = d_in;
    return buf.data();
}

// y [T, d_out] (row stride ys) = the fused linear of the prologue of x (see above), plus res
// [T, d_out] (row stride rs) when res_p is set (the block's residual adds); see the file comment.
void fused_linear_pe(uintptr_t x_p, int64_t T, int64_t xs, int64_t d_in,
                     uintptr_t w_aug_p, int64_t d_out, int64_t R, uintptr_t bias_p,
                     uintptr_t g_p, int64_t K, int64_t gs, uintptr_t y_p, int64_t ys,
                     uintptr_t parts_p, uintptr_t bptrs_p, int64_t P, uintptr_t blocks_p,
                     uintptr_t scale_p, int64_t J, int64_t threads, int64_t pro, uintptr_t pw_p,
                     double eps, uintptr_t res_p, int64_t rs) {
    if (T < 1 || T > 64) throw std::invalid_argument("fused_linear: T must be in [1, 64]");
    if (pro < PRO_NONE || pro > PRO_SILU_MUL) throw std::invalid_argument("fused_linear: unknown prologue");
    thread_local std::vector<float> xbuf;
    const float* x = apply_prologue(pro, ptr<const float>(x_p), xs, T, d_in, ptr<const float>(pw_p),
                                    static_cast<float>(eps), xbuf);
    const float* res = ptr<const float>(res_p);
    const float* w = ptr<const float>(w_aug_p);
    const float* bias = ptr<const float>(bias_p);
    const float* g = ptr<const float>(g_p);
    float* y = ptr<float>(y_p);
    const int64_t* parts = ptr<const int64_t>(parts_p);
    const int64_t* bptrs = ptr<const int64_t>(bptrs_p);
    const int64_t* blocks = ptr<const int64_t>(blocks_p);
    const float* scale = ptr<const float>(scale_p);

    thread_local std::vector<ActiveRow> rows;
    thread_local std::vector<char> active;
    thread_local std::vector<int64_t> act_blocks;               // active block ids, by part
    thread_local std::vector<float> h;                          // [T, R] gated shrink
    rows.clear();
    active.assign(J, 0);
    for (int64_t j = 0; j < J; ++j) {
        const int64_t e = blocks[3 * j];
        if (e < 0 || e >= K) throw std::invalid_argument("fused_linear: block expert outside [0, K)");
        for (int64_t t = 0; t < T; ++t) {
            if (g[t * gs + e] != 0.0f) { active[j] = 1; break; }
        }
        if (active[j]) {
            for (int64_t r = blocks[3 * j + 1]; r < blocks[3 * j + 2]; ++r) rows.push_back({r, e, scale[j]});
        }
    }
    if (h.size() < static_cast<size_t>(T * R)) h.resize(T * R);
    float* hp = h.data();
    const int64_t n1 = d_out + static_cast<int64_t>(rows.size());
    const ActiveRow* ar = rows.data();
    act_blocks.clear();
    for (int64_t j = 0; j < J; ++j) if (active[j]) act_blocks.push_back(j);  // parts' blocks are in order
    const int64_t* actb = act_blocks.data();
    const int64_t nab = static_cast<int64_t>(act_blocks.size());   // thread_local: read it here
    thread_local std::vector<Chunk> chunks;                    // pass 2: the parts with active
    chunks.clear();                                            // blocks, columns concatenated
    int64_t ncols = 0;
    for (int64_t p = 0, a0 = 0; p < P; ++p) {
        int64_t a1 = a0;
        while (a1 < nab && actb[a1] < parts[6 * p + 5]) ++a1;
        if (a1 > a0) {
            chunks.push_back({p, ncols, a0, a1});
            ncols += parts[6 * p + 1] - parts[6 * p];
        }
        a0 = a1;
    }
    const Chunk* chp = chunks.data();
    const int64_t nch = static_cast<int64_t>(chunks.size());

    py::gil_scoped_release release;
    #pragma omp parallel num_threads(static_cast<int>(threads))
    {
        float tmp[64];
        // Pass 1: base rows into y (+ bias), active A rows into h (gated).
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n1; ++i) {
            if (i < d_out) {
                row_dots(w + i * d_in, x, xs, static_cast<int>(T), static_cast<int>(d_in), tmp);
                const float b = bias ? bias[i] : 0.0f;
                if (res) for (int64_t t = 0; t < T; ++t) y[t * ys + i] = res[t * rs + i] + (tmp[t] + b);
                else for (int64_t t = 0; t < T; ++t) y[t * ys + i] = tmp[t] + b;
            } else {
                const ActiveRow& a = ar[i - d_out];
                row_dots(w + (d_out + a.r) * d_in, x, xs, static_cast<int>(T), static_cast<int>(d_in), tmp);
                for (int64_t t = 0; t < T; ++t) hp[t * R + a.r] = tmp[t] * g[t * gs + a.expert] * a.scale;
            }
        }
        // Pass 2: y[t, o] += sum over active rank rows r of h[t, r] * B_p^T[r, o].  Each thread
        // takes one contiguous share of the active parts' output columns (after pass 1's
        // barrier) and streams each active rank row of B^T across it: long sequential runs.
        const int64_t nth = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t c0 = (ncols * tid / nth) & ~int64_t(7), c1 = tid + 1 == nth ? ncols : (ncols * (tid + 1) / nth) & ~int64_t(7);
        for (int64_t q = 0; q < nch; ++q) {
            const Chunk& ch = chp[q];                  // a part: columns ch.o0 - ch.c (concatenated)
            const int64_t out0 = parts[6 * ch.part], pr0 = parts[6 * ch.part + 2];
            const int64_t dp = parts[6 * ch.part + 1] - out0;
            const int64_t lo = std::max(c0, ch.c), hi = std::min(c1, ch.c + dp);
            if (lo >= hi) continue;
            const int64_t o0 = out0 + (lo - ch.c), width = hi - lo, nv = width / 8;
            const float* BT = ptr<const float>(static_cast<uintptr_t>(bptrs[ch.part])) + (o0 - out0);
            for (int64_t t = 0; t < T; ++t) {
                float* yr = y + t * ys + o0;
                const float* hr = hp + t * R;
                for (int64_t a = ch.a0; a < ch.a1; ++a) {
                    const int64_t r0 = blocks[3 * actb[a] + 1], r1 = blocks[3 * actb[a] + 2];
                    for (int64_t r = r0; r < r1; ++r) {
                        const float hv = hr[r];
                        const __m256 hb = _mm256_set1_ps(hv);
                        const float* brow = BT + (r - pr0) * dp;
                        for (int64_t v = 0; v < nv; ++v)
                            _mm256_storeu_ps(yr + 8 * v, _mm256_fmadd_ps(hb, _mm256_loadu_ps(brow + 8 * v),
                                                                         _mm256_loadu_ps(yr + 8 * v)));
                        for (int64_t k = 8 * nv; k < width; ++k) yr[k] += hv * brow[k];
                    }
                }
            }
        }
    }
}

void fused_linear(uintptr_t x_p, int64_t T, int64_t xs, int64_t d_in,
                  uintptr_t w_aug_p, int64_t d_out, int64_t R, uintptr_t bias_p,
                  uintptr_t g_p, int64_t K, int64_t gs, uintptr_t y_p, int64_t ys,
                  uintptr_t parts_p, uintptr_t bptrs_p, int64_t P, uintptr_t blocks_p,
                  uintptr_t scale_p, int64_t J, int64_t threads) {
    fused_linear_pe(x_p, T, xs, d_in, w_aug_p, d_out, R, bias_p, g_p, K, gs, y_p, ys, parts_p,
                    bptrs_p, P, blocks_p, scale_p, J, threads, PRO_NONE, 0, 0.0, 0, 0);
}

bool cpu_supported() { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"); }

// The old raw-pointer entry points (OpenMP), bound into _pf_cpu by binding.cpp.
void bind_legacy(py::module_& m) {
    m.def("fused_linear", &fused_linear, "see csrc/cpu/grouped_lora_cpu.cpp");
    m.def("fused_linear_pe", &fused_linear_pe, "fused_linear with a prologue (0 none, 1 rmsnorm, "
          "2 silu-mul) and a residual: see csrc/cpu/grouped_lora_cpu.cpp");
    m.def("decode_attention", &decode_attention, "see csrc/cpu/decode_attention.cpp");
    m.def("cpu_supported", &cpu_supported, "AVX2 and FMA present on this CPU");
    m.attr("MAX_TOKENS") = 64;
}
