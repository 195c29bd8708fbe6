// linear_run: the fused grouped-LoRA linear of linear_plan.h on the pool (pool.h).
#include "linear_plan.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <thread>

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
    std::vector<PanelBlock> panels;                      // q8: act's panels, h quantized:
    std::vector<int32_t> hw;                             //   [T, hws] words, 4 int8 each
    std::vector<float> sh;                               //   [T, act.size()] scales
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
    HrowsDots hdots;           // and its 16-bit dots
    int64_t nb;
    float* h;
    const ActiveRow* rows;
    int64_t n1, rows_per_chunk;
    const int64_t* act;
    const Segment* segs;
    int64_t nsegs, ncols, cols_per_chunk;
    const PanelBlock* panels;  // q8 experts: act's panels and h quantized (quantize_h)
    int32_t* hw;
    int64_t hws;
    float* sh;
    int64_t nact;
    ExpandQ8 expand_q8;        // the instruction set's (isa.h)

    // Pass 1, rows j0:j1 of [active rows of A_cat; W] (the experts' rows first, so that h is
    // done early: quantize_h runs once every pass-1 chunk is, run_job).
    static constexpr int64_t kRowBlock = 4;
    void pass1(int64_t chunk) const {
        const int64_t j0 = chunk * rows_per_chunk, j1 = std::min(n1, j0 + rows_per_chunk);
        const int64_t na = n1 - lin.d_out;
        if (j0 < na) a_rows(j0, std::min(j1, na));
        if (j1 > na) w_rows(std::max(j0, na) - na, j1 - na);
    }

    // Rows i0:i1 of W: y.
    void w_rows(int64_t i0, int64_t i1) const {
        const int T = static_cast<int>(call.T), d_in = static_cast<int>(lin.d_in);
        float tmp[kRowBlock * MAX_ROWS];
        int64_t i = i0;
        if (lin.fmt != FMT_F32) {                    // kRowBlock rows of W per kernel call
            while (i < i1) {
                const int64_t n = std::min(kRowBlock, i1 - i);
                const uint8_t* w = lin.wq + i * lin.row_bytes;
                if (xq) qdots(lin.fmt, w, lin.row_bytes, n, xq, T, nb, tmp, MAX_ROWS);
                else hdots(lin.fmt, w, lin.row_bytes, n, x, xs, T, lin.d_in, tmp, MAX_ROWS);
                for (int64_t r = 0; r < n; ++r) store(i + r, tmp + r * MAX_ROWS);
                i += n;
            }
        }
        for (; i < i1; ++i) {
            row_dots(lin.w + i * d_in, x, xs, T, d_in, tmp);
            store(i, tmp);
        }
    }

    // Active rows k0:k1 of A_cat, in runs of consecutive rows: h.
    void a_rows(int64_t k0, int64_t k1) const {
        const int T = static_cast<int>(call.T);
        const int64_t R = lin.rank;
        float tmp[kRowBlock * MAX_ROWS];
        for (int64_t k = k0; k < k1;) {
            const ActiveRow* a = rows + k;
            int64_t n = 1;
            while (n < kRowBlock && k + n < k1 && a[n].r == a[0].r + n) ++n;
            expert_dots(a[0].r, n, tmp);
            for (int64_t m = 0; m < n; ++m)
                for (int t = 0; t < T; ++t)
                    h[t * R + a[m].r] = tmp[m * MAX_ROWS + t] * call.gates[t * call.gs + a[m].expert] * a[m].scale;
            k += n;
        }
    }

    // out[k * MAX_ROWS + t] = A_cat[r + k] . x'[t] for k < n, in the experts' format.
    void expert_dots(int64_t r, int64_t n, float* out) const {
        const uint8_t* a = lin.a + r * lin.a_row_bytes;
        const int T = static_cast<int>(call.T);
        switch (lin.efmt) {
            case FMT_BF16: hdots(FMT_BF16, a, lin.a_row_bytes, n, x, xs, T, lin.d_in, out, MAX_ROWS); break;
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
            case FMT_Q8_0: return pass2_q8(chunk);
            default: return pass2_fmt<FMT_F32>(chunk);
        }
    }

    // q8: the chunk's groups of 8 columns of each segment, every active block's panel at once.
    void pass2_q8(int64_t chunk) const {
        const int64_t c0 = chunk * cols_per_chunk, c1 = std::min(ncols, c0 + cols_per_chunk);
        for (int64_t q = 0; q < nsegs; ++q) {
            const Segment& sg = segs[q];
            const LoraPart& p = lin.parts[sg.part];
            const int64_t g = EXPERT_COL_ALIGN;         // a panel group's columns
            const int64_t lo = std::max(c0, sg.c) - sg.c, hi = std::min(c1, sg.c + round_up(p.out1 - p.out0, g)) - sg.c;
            if (lo >= hi) continue;
            expand_q8(panels + sg.a0, static_cast<int>(sg.a1 - sg.a0), lo / g, ceil_div(hi, g), hw, hws,
                      sh + sg.a0, nact, static_cast<int>(call.T), call.y + p.out0, call.ys, p.out1 - p.out0);
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
                            expand<EF, 4>(h + t * R + r, brow, p.bstride, off, width, call.y + t * call.ys + o0);
                    }
                    for (; r < b.r1; ++r) {
                        const uint8_t* brow = p.bT + (r - p.r0) * p.bstride;
                        for (int64_t t = 0; t < call.T; ++t)
                            expand<EF, 1>(h + t * R + r, brow, p.bstride, off, width, call.y + t * call.ys + o0);
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

// q8 experts: each active block's panel and where its quantized h goes (made by the caller, before
// the region); returns the int32 words of h per token.
int64_t prepare_panels(const Linear& lin, int64_t T, Scratch& s) {
    const int64_t nact = static_cast<int64_t>(s.act.size());
    s.panels.resize(static_cast<size_t>(nact));
    int64_t hws = 0;
    for (const Segment& sg : s.segs)
        for (int64_t a = sg.a0; a < sg.a1; ++a) {
            const LoraBlock& b = lin.blocks[s.act[a]];
            s.panels[a] = {lin.parts[sg.part].bT + b.boff, 4 + 32 * b.nq, b.nq, hws};
            hws += b.nq;
        }
    s.hw.assign(static_cast<size_t>(T * hws), 0);
    s.sh.resize(static_cast<size_t>(T * nact));
    return hws;
}

// h [T, r0:r1] of each active block quantized per token (expand_q8.h: sh = max|h| / 127,
// hq = round(h / sh) half away from zero, zero padded to 4 nq values).
void quantize_h(const Linear& lin, const Job& job) {
    for (int64_t t = 0; t < job.call.T; ++t)
        for (int64_t a = 0; a < job.nact; ++a) {
            const LoraBlock& b = lin.blocks[job.act[a]];
            const float* ht = job.h + t * lin.rank;
            float mx = 0.0f;
            for (int64_t r = b.r0; r < b.r1; ++r) mx = std::max(mx, std::fabs(ht[r]));
            const float id = mx > 0.0f ? 127.0f / mx : 0.0f;
            int8_t* q = reinterpret_cast<int8_t*>(job.hw + t * job.hws + job.panels[a].hoff);
            for (int64_t r = b.r0; r < b.r1; ++r) {
                const float v = ht[r] * id;
                q[r - b.r0] = static_cast<int8_t>(std::max(-127.0f, std::min(127.0f, std::trunc(v + std::copysign(0.5f, v)))));
            }
            job.sh[t * job.nact + a] = mx / 127.0f;
        }
}

// Pass 1's chunks, then pass 2's, in one parallel region: a pass-2 chunk waits until every
// pass-1 chunk is done (pass 1 stores y's rows, pass 2 adds to them) and, for q8 experts, h is
// quantized (by the thread that finished the last of them).  Chunks are claimed in order, so
// when a pass-2 chunk is claimed every pass-1 chunk has been: it waits only for those still
// running on other threads, without the second job a separate region would post.
void run_job(const Linear& lin, const Job& job, int64_t chunks2, int threads) {
    const int64_t chunks1 = ceil_div(job.n1, job.rows_per_chunk);
    std::atomic<int64_t> left{chunks1};
    std::atomic<bool> ready{false};
    parallel_for(chunks1 + chunks2, threads, [&](int64_t c) {
        if (c < chunks1) {
            job.pass1(c);
            if (left.fetch_sub(1, std::memory_order_acq_rel) == 1) {
                if (lin.efmt == FMT_Q8_0 && chunks2 > 0) quantize_h(lin, job);
                ready.store(true, std::memory_order_release);
            }
            return;
        }
        for (int spins = 0; !ready.load(std::memory_order_acquire); ++spins) {
            if (spins < 4096) _mm_pause();
            else std::this_thread::yield();
        }
        job.pass2(c - chunks1);
    });
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
    const XRow* xq = is_block(lin.fmt) ? quantize_rows(x, xs, call.T, nb, is_paired(lin.fmt), s.xq, s.xrows) : nullptr;
    const XRow* xe = nullptr;                  // q8_0 experts' activations: W's when unpaired
    if (lin.efmt == FMT_Q8_0 && !s.rows.empty())
        xe = xq && !is_paired(lin.fmt) ? xq : quantize_rows(x, xs, call.T, nb, false, s.xe, s.xerows);
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
    Job job{lin, call, x, xs, xq, xe, (xq || xe) ? qrows_dots_kernel() : nullptr, hrows_dots_kernel(), nb, s.h.data(), s.rows.data(), n1, rpc, s.act.data(), s.segs.data(),
            static_cast<int64_t>(s.segs.size()), ncols, cpc, nullptr, nullptr, 0, nullptr, 0, nullptr};
    if (lin.efmt == FMT_Q8_0 && ncols > 0) {
        job.hws = prepare_panels(lin, call.T, s);
        job.panels = s.panels.data();
        job.hw = s.hw.data();
        job.sh = s.sh.data();
        job.nact = static_cast<int64_t>(s.act.size());
        job.expand_q8 = expand_q8_kernel();
    }
    run_job(lin, job, ncols > 0 ? ceil_div(ncols, cpc) : 0, threads);
}

Chunking chunking() { return {g_pass1_bytes.load(), g_pass2_bytes.load()}; }

void set_chunking(const Chunking& c) {
    g_pass1_bytes.store(std::max<int64_t>(1, c.pass1_bytes));
    g_pass2_bytes.store(std::max<int64_t>(1, c.pass2_bytes));
}

}  // namespace pf_cpu
