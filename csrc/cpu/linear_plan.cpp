// linear_run: the fused grouped-LoRA linear of linear_plan.h on the pool (pool.h).
#include "linear_plan.h"

#include <algorithm>
#include <atomic>

#include "expert.h"
#include "half.h"
#include "isa.h"
#include "kernels.h"
#include "pool.h"
#include "quant.h"

namespace pf_cpu {
namespace {

std::atomic<int64_t> g_pass1_bytes{Chunking{}.pass1_bytes};
std::atomic<int64_t> g_pass2_bytes{Chunking{}.pass2_bytes};

struct ActiveRow { int64_t r, expert; float scale; };   // a row of A_cat that pass 1 computes
struct Segment { int64_t part, c, a0, a1; };            // an active part: its first column in
                                                        // pass 2's concatenation, its active
                                                        // blocks act[a0:a1]
struct Scratch {
    std::vector<float> x, h;                             // x' [T, d_in], h [T, R]
    std::vector<float> xq, xe;                           // x' quantized: T XRows (quant.h) for
    std::vector<XRow> xrows, xerows;                     // W, and for q8_0 experts (unpaired)
    std::vector<ActiveRow> rows;
    std::vector<int64_t> act;                            // active block ids, by part
    std::vector<Segment> segs;
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// What both passes read, made once per call by the calling thread.
struct Job {
    const Linear& lin;
    const LinearCall& call;
    const float* x;            // x' (the prologue's output, or call.x)
    int64_t xs;
    const XRow* xq;            // x' quantized, T rows (a block-quantized W), else null
    const XRow* xe;            // x' quantized unpaired, T rows (q8_0 experts), else null
    QrowsDots qdots;           // the block dots of the instruction set in use (isa.h)
    int64_t nb;
    float* h;
    const ActiveRow* rows;
    int64_t n1, rows_per_chunk;
    const int64_t* act;
    const Segment* segs;
    int64_t nsegs, ncols, cols_per_chunk;

    // Pass 1, rows i0:i1 of [W; active rows of A_cat].
    static constexpr int64_t kRowBlock = 4;
    void pass1(int64_t chunk) const {
        const int64_t i0 = chunk * rows_per_chunk, i1 = std::min(n1, i0 + rows_per_chunk);
        const int T = static_cast<int>(call.T), d_in = static_cast<int>(lin.d_in);
        const int64_t d_out = lin.d_out, R = lin.rank;
        float tmp[kRowBlock * MAX_ROWS];
        int64_t i = i0;
        if (lin.fmt != FMT_F32) {                    // kRowBlock rows of W per kernel call
            const int64_t e = std::min(i1, d_out);
            while (i < e) {
                const int64_t n = std::min(kRowBlock, e - i);
                const uint8_t* w = lin.wq + i * lin.row_bytes;
                if (xq) qdots(lin.fmt, w, lin.row_bytes, n, xq, T, nb, tmp, MAX_ROWS);
                else hrows_dots(lin.fmt, w, lin.row_bytes, n, x, xs, T, lin.d_in, tmp, MAX_ROWS);
                for (int64_t r = 0; r < n; ++r) store(i + r, tmp + r * MAX_ROWS);
                i += n;
            }
        }
        for (; i < std::min(i1, d_out); ++i) {
            row_dots(lin.w + i * d_in, x, xs, T, d_in, tmp);
            store(i, tmp);
        }
        while (i < i1) {                             // runs of consecutive rows of A_cat
            const ActiveRow* a = rows + (i - d_out);
            int64_t n = 1;
            while (n < kRowBlock && i + n < i1 && a[n].r == a[0].r + n) ++n;
            expert_dots(a[0].r, n, tmp);
            for (int64_t k = 0; k < n; ++k)
                for (int t = 0; t < T; ++t)
                    h[t * R + a[k].r] = tmp[k * MAX_ROWS + t] * call.gates[t * call.gs + a[k].expert] * a[k].scale;
            i += n;
        }
    }

    // out[k * MAX_ROWS + t] = A_cat[r + k] . x'[t] for k < n, in the experts' format.
    void expert_dots(int64_t r, int64_t n, float* out) const {
        const uint8_t* a = lin.a + r * lin.a_row_bytes;
        const int T = static_cast<int>(call.T);
        switch (lin.efmt) {
            case FMT_BF16: hrows_dots(FMT_BF16, a, lin.a_row_bytes, n, x, xs, T, lin.d_in, out, MAX_ROWS); break;
            case FMT_Q8_0: qdots(FMT_Q8_0, a, lin.a_row_bytes, n, xe, T, nb, out, MAX_ROWS); break;
            default:
                for (int64_t k = 0; k < n; ++k)
                    row_dots(reinterpret_cast<const float*>(a) + k * lin.d_in, x, xs, T,
                             static_cast<int>(lin.d_in), out + k * MAX_ROWS);
        }
    }

    // y[t, i] = (res[t, i] +) v[t] + bias[i] for base row i.
    void store(int64_t i, const float* v) const {
        const float b = lin.bias ? lin.bias[i] : 0.0f;
        float* y = call.y + i;
        if (call.res) {
            const float* res = call.res + i;
            for (int64_t t = 0; t < call.T; ++t) y[t * call.ys] = res[t * call.rs] + (v[t] + b);
        } else {
            for (int64_t t = 0; t < call.T; ++t) y[t * call.ys] = v[t] + b;
        }
    }

    // Pass 2, concatenated columns c0:c1: y[t, o] += sum over active rank rows r of h[t, r] bT[r, o],
    // in tiles of kTile columns (four rank rows of bT and the T rows of y stay in L1 across t),
    // four rank rows at a time (one load and store of y per four FMAs).
    static constexpr int64_t kTile = 256;
    void pass2(int64_t chunk) const {
        switch (lin.efmt) {
            case FMT_BF16: return pass2_fmt<FMT_BF16>(chunk);
            case FMT_Q8_0: return pass2_fmt<FMT_Q8_0>(chunk);
            default: return pass2_fmt<FMT_F32>(chunk);
        }
    }

    template <int EF>
    void pass2_fmt(int64_t chunk) const {
        const int64_t c0 = chunk * cols_per_chunk, c1 = std::min(ncols, c0 + cols_per_chunk);
        const int64_t R = lin.rank;
        for (int64_t q = 0; q < nsegs; ++q) {
            const Segment& sg = segs[q];
            const LoraPart& p = lin.parts[sg.part];
            const int64_t dp = p.out1 - p.out0;
            const int64_t lo = std::max(c0, sg.c), hi = std::min(c1, sg.c + dp);
            for (int64_t t0 = lo; t0 < hi; t0 += kTile) {
                const int64_t off = t0 - sg.c, o0 = p.out0 + off, width = std::min(kTile, hi - t0);
                for (int64_t a = sg.a0; a < sg.a1; ++a) {
                    const LoraBlock& b = lin.blocks[act[a]];
                    int64_t r = b.r0;
                    for (; r + 4 <= b.r1; r += 4) {
                        const uint8_t* brow = p.bT + (r - p.r0) * p.bstride;
                        for (int64_t t = 0; t < call.T; ++t)
                            expand<EF, 4>(h + t * R + r, brow, p.bstride, p.bvals, off, width, call.y + t * call.ys + o0);
                    }
                    for (; r < b.r1; ++r) {
                        const uint8_t* brow = p.bT + (r - p.r0) * p.bstride;
                        for (int64_t t = 0; t < call.T; ++t)
                            expand<EF, 1>(h + t * R + r, brow, p.bstride, p.bvals, off, width, call.y + t * call.ys + o0);
                    }
                }
            }
        }
    }
};

// x' for the prologue (or x itself); sets xs to x's row stride.
const float* prologue(const Linear& lin, const LinearCall& c, Scratch& s, int64_t& xs) {
    xs = c.xs;
    if (c.prologue == PRO_NONE) return c.x;
    s.x.resize(static_cast<size_t>(c.T * lin.d_in));
    for (int64_t t = 0; t < c.T; ++t) {
        float* out = s.x.data() + t * lin.d_in;
        if (c.prologue == PRO_RMSNORM) rmsnorm_row(c.x + t * c.xs, c.norm, lin.d_in, c.eps, out);
        else silu_mul_row(c.x + t * c.xs, lin.d_in, out);
    }
    xs = lin.d_in;
    return s.x.data();
}

// x' [T rows at stride xs] quantized per block into buf (pairs: the Q4 order); T XRows.
const XRow* quantize_rows(const float* x, int64_t xs, int64_t T, int64_t nb, bool pairs,
                          std::vector<float>& buf, std::vector<XRow>& rows) {
    const int64_t per = xrow_floats(nb);
    if (buf.size() < static_cast<size_t>(T * per)) buf.resize(static_cast<size_t>(T * per));
    rows.resize(static_cast<size_t>(T));
    for (int64_t t = 0; t < T; ++t) {
        rows[t] = xrow_at(buf.data() + t * per, nb);
        quantize_x(x + t * xs, nb, pairs, rows[t]);
    }
    return rows.data();
}

// The active blocks (an expert with a nonzero gate in some row), their rows, and pass 2's
// segments; returns pass 2's column count.
int64_t route(const Linear& lin, const LinearCall& c, Scratch& s) {
    s.rows.clear();
    s.act.clear();
    s.segs.clear();
    if (c.gates == nullptr) return 0;
    int64_t ncols = 0;
    for (int64_t p = 0; p < static_cast<int64_t>(lin.parts.size()); ++p) {
        const LoraPart& part = lin.parts[p];
        const int64_t a0 = static_cast<int64_t>(s.act.size());
        for (int64_t j = part.b0; j < part.b1; ++j) {
            const LoraBlock& b = lin.blocks[j];
            bool on = false;
            for (int64_t t = 0; t < c.T && !on; ++t) on = c.gates[t * c.gs + b.expert] != 0.0f;
            if (!on) continue;
            s.act.push_back(j);
            for (int64_t r = b.r0; r < b.r1; ++r) s.rows.push_back({r, b.expert, b.scale});
        }
        const int64_t a1 = static_cast<int64_t>(s.act.size());
        if (a1 > a0) {
            s.segs.push_back({p, ncols, a0, a1});
            ncols += round_up(part.out1 - part.out0, EXPERT_COL_ALIGN);
        }
    }
    return ncols;
}

}  // namespace

void linear_run(const Linear& lin, const LinearCall& call, int threads) {
    thread_local Scratch s;
    int64_t xs = 0;
    const float* x = prologue(lin, call, s, xs);
    const int64_t ncols = route(lin, call, s);
    if (!s.rows.empty() && s.h.size() < static_cast<size_t>(call.T * lin.rank))
        s.h.resize(static_cast<size_t>(call.T * lin.rank));
    const int64_t nb = lin.d_in / QK;
    const XRow* xq = is_block(lin.fmt) ? quantize_rows(x, xs, call.T, nb, lin.fmt != FMT_Q8_0, s.xq, s.xrows) : nullptr;
    const XRow* xe = nullptr;                  // q8_0 experts' activations: W's when unpaired
    if (lin.efmt == FMT_Q8_0 && !s.rows.empty())
        xe = lin.fmt == FMT_Q8_0 ? xq : quantize_rows(x, xs, call.T, nb, false, s.xe, s.xerows);
    const int64_t n1 = lin.d_out + static_cast<int64_t>(s.rows.size());
    const int64_t row_bytes = lin.row_bytes;
    int64_t rpc = std::max<int64_t>(1, g_pass1_bytes.load(std::memory_order_relaxed) / row_bytes);
    rpc = std::max(rpc, ceil_div(n1, kMaxChunks));
    int64_t part_rows = 1;                     // the most active rank rows of one part: what
    for (const Segment& sg : s.segs) {        // a pass-2 column streams
        int64_t n = 0;
        for (int64_t a = sg.a0; a < sg.a1; ++a) n += lin.blocks[s.act[a]].r1 - lin.blocks[s.act[a]].r0;
        part_rows = std::max(part_rows, n);
    }
    const int64_t col_bytes = (lin.efmt == FMT_F32 ? 4 : lin.efmt == FMT_BF16 ? 2 : 1) * part_rows;
    int64_t cpc = ceil_div(std::max<int64_t>(1, g_pass2_bytes.load(std::memory_order_relaxed) / col_bytes), 8) * 8;
    cpc = std::max(cpc, ceil_div(ceil_div(ncols, kMaxChunks), 8) * 8);
    const Job job{lin, call, x, xs, xq, xe, (xq || xe) ? qrows_dots_kernel() : nullptr, nb, s.h.data(), s.rows.data(), n1, rpc, s.act.data(), s.segs.data(),
                  static_cast<int64_t>(s.segs.size()), ncols, cpc};
    parallel_for(ceil_div(n1, rpc), threads, [&job](int64_t c) { job.pass1(c); });
    if (ncols > 0) parallel_for(ceil_div(ncols, cpc), threads, [&job](int64_t c) { job.pass2(c); });
}

Chunking chunking() { return {g_pass1_bytes.load(), g_pass2_bytes.load()}; }

void set_chunking(const Chunking& c) {
    g_pass1_bytes.store(std::max<int64_t>(1, c.pass1_bytes));
    g_pass2_bytes.store(std::max<int64_t>(1, c.pass2_bytes));
}

}  // namespace pf_cpu
