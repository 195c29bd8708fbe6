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
#include "linear_x.h"
#include "pool.h"
#include "quant.h"

namespace pf_cpu {
namespace {

std::atomic<int64_t> g_chunk_bytes{Chunking{}.bytes};

struct ActiveRow { int64_t r, expert; float scale; };   // a row of A_cat that h needs
struct Segment { int64_t part, a0, a1; };               // an active part: its active blocks act[a0:a1]
struct WChunk { int64_t i0, i1, seg; };                 // rows i0:i1 of W, inside segment seg's
                                                        // part (its expand follows) or none (-1)
struct Scratch {
    std::vector<float> x, h;                             // x' [T, d_in], h [T, R]
    std::vector<float> xq, xe;                           // x' quantized: T XRows (quant.h) for
    std::vector<XRow> xrows, xerows;                     // W, and for q8_0 experts (unpaired)
    std::vector<ActiveRow> rows;
    std::vector<int64_t> act;                            // active block ids, by part
    std::vector<Segment> segs;
    std::vector<WChunk> wch;
    std::vector<PanelBlock> panels;                      // q8: act's panels, h quantized:
    std::vector<int32_t> hw;                             //   [T, hws] words, 4 int8 each
    std::vector<float> sh;                               //   [T, act.size()] scales
    std::vector<int32_t> tq;                             // x' packed for tiles (XTiles)
    std::vector<float> td, ts;
    std::vector<uint16_t> hb;                            // x' in bf16 for a bf16 W's tiles
};

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// What every chunk reads, made once per call by the calling thread.
struct Job {
    const Linear& lin;
    const LinearCall& call;
    const float* x;            // x' (the prologue's output, or call.x)
    int64_t xs;
    const XRow* xq;            // x' quantized, T rows (a block-quantized W), else null
    const XRow* xe;            // x' quantized unpaired, T rows (q8_0 experts), else null
    QrowsDots qdots;           // the block dots of the instruction set in use (isa.h)
    HrowsDots hdots;           // and its 16-bit dots
    QrowsTiles tiles;          // and its tiles (amx.h) with xt, for this call's W; else null
    XTiles xt;
    HrowsTiles htiles;         // a bf16 W's tiles (amx_bf16.h) with xb, calls of HALF_TILE_MIN+; else null
    const uint16_t* xb;
    int64_t nb;
    float* h;
    const ActiveRow* rows;
    int64_t na, a_per_chunk;   // active rows of A_cat, and per A chunk
    const Segment* segs;
    const WChunk* wch;
    const int64_t* act;
    const PanelBlock* panels;  // q8 experts: act's panels and h quantized (quantize_h)
    int32_t* hw;
    int64_t hws;
    float* sh;
    int64_t nact;
    ExpandQ8 expand_q8;        // the instruction set's (isa.h)
    std::atomic<bool>* ready;  // h is done (and quantized, q8)

    static constexpr int64_t kRowBlock = 4;
    static constexpr int kF32Rows = 3;         // rows of an fp32 W per register block (kernels.h)

    // A chunk c: its active rows of A_cat, h.
    void a_chunk(int64_t c) const { a_rows(c * a_per_chunk, std::min(na, (c + 1) * a_per_chunk)); }

    // W chunk k: its rows of W (y), then, inside an active part, the part's expand over the same
    // columns, once h is ready (the A chunks were claimed first: by now they are done unless
    // their thread was descheduled).
    void w_chunk(int64_t k) const {
        const WChunk& c = wch[k];
        w_rows(c.i0, c.i1);
        if (c.seg < 0) return;
        for (int spins = 0; !ready->load(std::memory_order_acquire); ++spins) {
            if (spins < 4096) _mm_pause();
            else std::this_thread::yield();
        }
        const Segment& sg = segs[c.seg];
        const LoraPart& p = lin.parts[sg.part];
        const int64_t lo = c.i0 - p.out0, hi = c.i1 - p.out0;
        switch (lin.efmt) {
            case FMT_BF16: return expand_fmt<FMT_BF16>(sg, lo, hi);
            case FMT_Q8_0: return expand_q8(panels + sg.a0, static_cast<int>(sg.a1 - sg.a0), lo / EXPERT_COL_ALIGN,
                                            ceil_div(hi, EXPERT_COL_ALIGN), hw, hws, sh + sg.a0, nact,
                                            static_cast<int>(call.T), call.y + p.out0, call.ys, p.out1 - p.out0);
            default: return expand_fmt<FMT_F32>(sg, lo, hi);
        }
    }

    // Rows i0:i1 of W: y, for the tokens in groups of MAX_ROWS: the chunk's rows of W stay in
    // L2 across the groups, so a call over many tokens streams W from memory once.  Each dot
    // sums in the same order whatever group its token lands in (a token's y is its own).
    void w_rows(int64_t i0, int64_t i1) const {
        for (int64_t t0 = 0; t0 < call.T; t0 += MAX_ROWS)
            w_rows_group(i0, i1, t0, static_cast<int>(std::min(MAX_ROWS, call.T - t0)));
    }

    void w_rows_group(int64_t i0, int64_t i1, int64_t t0, int T) const {
        const int d_in = static_cast<int>(lin.d_in);
        const float* xg = x + t0 * xs;
        constexpr int64_t kTileBatch = 4 * TILE_ROWS;  // rows per tiles call
        float tmp[kTileBatch * MAX_ROWS];
        int64_t i = i0;
        if (htiles)                                  // a bf16 W: every row on tiles
            for (; i < i1; i += std::min(kTileBatch, i1 - i)) {
                const int64_t n = std::min(kTileBatch, i1 - i);
                htiles(lin.wq + i * lin.row_bytes, lin.row_bytes, n, xb, t0 / TILE_ROWS, T, lin.d_in, tmp, MAX_ROWS);
                store_rows(i, n, tmp, t0, T);
            }
        if (tiles)                                   // 16 rows a tile, the rest below (same bits)
            while (i + TILE_ROWS <= i1) {
                const int64_t n = std::min(kTileBatch, (i1 - i) / TILE_ROWS * TILE_ROWS);
                tiles(lin.fmt, lin.wq + i * lin.row_bytes, lin.row_bytes, n, xt, t0 / TILE_ROWS, T, tmp, MAX_ROWS);
                store_rows(i, n, tmp, t0, T);
                i += n;
            }
        if (lin.fmt != FMT_F32) {                    // kRowBlock rows of W per kernel call
            while (i < i1) {
                const int64_t n = std::min(kRowBlock, i1 - i);
                const uint8_t* w = lin.wq + i * lin.row_bytes;
                if (xq) qdots(lin.fmt, w, lin.row_bytes, n, xq + t0, T, nb, tmp, MAX_ROWS);
                else hdots(lin.fmt, w, lin.row_bytes, n, xg, xs, T, lin.d_in, tmp, MAX_ROWS);
                store_rows(i, n, tmp, t0, T);
                i += n;
            }
        }
        // fp32: kF32Rows x 4 register blocks once the chunk's rows are in cache (every group
        // after the first); the first group streams W row by row (three rows at once from memory
        // measured 1.5x slower at decode), one token asking for the weights ahead as it goes
        // (kernels.h dot_ahead).  Same bits every way.
        for (; t0 > 0 && i + kF32Rows <= i1; i += kF32Rows) {
            rows_dots<kF32Rows>(lin.w + i * d_in, d_in, xg, xs, T, d_in, tmp, MAX_ROWS);
            store_rows(i, kF32Rows, tmp, t0, T);
        }
        for (; T == 1 && i < i1; ++i) {
            tmp[0] = dot_ahead(lin.w + i * d_in, xg, d_in);
            store(i, tmp, t0, T);
        }
        for (; i < i1; ++i) {
            row_dots(lin.w + i * d_in, xg, xs, T, d_in, tmp);
            store(i, tmp, t0, T);
        }
    }

    // Active rows k0:k1 of A_cat, in runs of consecutive rows: h, tokens in groups of MAX_ROWS.
    void a_rows(int64_t k0, int64_t k1) const {
        const int64_t R = lin.rank;
        float tmp[kRowBlock * MAX_ROWS];
        for (int64_t k = k0; k < k1;) {
            const ActiveRow* a = rows + k;
            int64_t n = 1;
            while (n < kRowBlock && k + n < k1 && a[n].r == a[0].r + n) ++n;
            for (int64_t t0 = 0; t0 < call.T; t0 += MAX_ROWS) {
                const int T = static_cast<int>(std::min(MAX_ROWS, call.T - t0));
                expert_dots(a[0].r, n, t0, T, tmp);
                for (int64_t m = 0; m < n; ++m)
                    for (int64_t t = t0; t < t0 + T; ++t)
                        h[t * R + a[m].r] = tmp[m * MAX_ROWS + t - t0] * call.gates[t * call.gs + a[m].expert] * a[m].scale;
            }
            k += n;
        }
    }

    // out[k * MAX_ROWS + t] = A_cat[r + k] . x'[t0 + t] for k < n, t < T, in the experts' format.
    void expert_dots(int64_t r, int64_t n, int64_t t0, int T, float* out) const {
        const uint8_t* a = lin.a + r * lin.a_row_bytes;
        const float* xg = x + t0 * xs;
        switch (lin.efmt) {
            case FMT_BF16: hdots(FMT_BF16, a, lin.a_row_bytes, n, xg, xs, T, lin.d_in, out, MAX_ROWS); break;
            case FMT_Q8_0: qdots(FMT_Q8_0, a, lin.a_row_bytes, n, xe + t0, T, nb, out, MAX_ROWS); break;
            default:
                for (int64_t k = 0; k < n; ++k)
                    row_dots(reinterpret_cast<const float*>(a) + k * lin.d_in, xg, xs, T,
                             static_cast<int>(lin.d_in), out + k * MAX_ROWS);
        }
    }

    // y[t, i] = (res[t, i] +) v[t - t0] + bias[i] for base row i, tokens t0:t0 + T.
    void store(int64_t i, const float* v, int64_t t0, int T) const { store_rows(i, 1, v, t0, T); }

    // store for rows i:i + n, row r's values at v + r MAX_ROWS: token by token, so each token's
    // n outputs are written side by side (a row at a time wrote one value per token's row of y).
    void store_rows(int64_t i, int64_t n, const float* v, int64_t t0, int T) const {
        const float* b = lin.bias ? lin.bias + i : nullptr;
        for (int64_t t = t0; t < t0 + T; ++t) {
            float* y = call.y + t * call.ys + i;
            const float* vt = v + (t - t0);
            const float* res = call.res ? call.res + t * call.rs + i : nullptr;
            for (int64_t r = 0; r < n; ++r) {
                const float o = vt[r * MAX_ROWS] + (b ? b[r] : 0.0f);
                y[r] = res ? res[r] + o : o;
            }
        }
    }

    // f32 / bf16: y[t, out0 + o] += sum over the segment's active rank rows r of h[t, r] bT[r, o]
    // for o in lo:hi, in tiles of kTile columns (four rank rows of bT and the T rows of y stay in
    // L1 across t), four rank rows at a time (one load and store of y per four FMAs).
    static constexpr int64_t kTile = 256;
    template <int EF>
    void expand_fmt(const Segment& sg, int64_t lo, int64_t hi) const {
        const LoraPart& p = lin.parts[sg.part];
        const int64_t R = lin.rank;
        for (int64_t off = lo; off < hi; off += kTile) {
            const int64_t o0 = p.out0 + off, width = std::min(kTile, hi - off);
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
};

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

// The A chunks, then the W chunks, in one parallel region; the thread finishing the last A chunk
// quantizes h (q8) and marks it ready for the W chunks' expands.  Chunks are claimed in order,
// so every A chunk is claimed before any W chunk: a W chunk's expand waits only for A chunks
// still running elsewhere, and only after its own rows of W.
void run_job(const Linear& lin, Job& job, int64_t chunks_w, int threads) {
    const int64_t chunks_a = ceil_div(job.na, job.a_per_chunk);
    std::atomic<int64_t> left{chunks_a};
    std::atomic<bool> ready{chunks_a == 0};
    job.ready = &ready;
    parallel_for(chunks_a + chunks_w, threads, [&](int64_t c) {
        if (c >= chunks_a) return job.w_chunk(c - chunks_a);
        job.a_chunk(c);
        if (left.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            if (lin.efmt == FMT_Q8_0) quantize_h(lin, job);
            ready.store(true, std::memory_order_release);
        }
    });
}

// The active blocks (an expert with a nonzero gate in some row), their rows, and the segments.
void route(const Linear& lin, const LinearCall& c, Scratch& s) {
    s.rows.clear();
    s.act.clear();
    s.segs.clear();
    if (c.gates == nullptr) return;
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
        if (a1 > a0) s.segs.push_back({p, a0, a1});
    }
}

// W's rows in chunks of about ``per`` rows: none straddles an active part's edge, and inside one
// a chunk starts a multiple of EXPERT_COL_ALIGN columns from the part's first (a q8 panel group is
// one chunk's alone).
void split_w(const Linear& lin, int64_t per, Scratch& s) {
    s.wch.clear();
    const int64_t aligned = round_up(per, EXPERT_COL_ALIGN);
    int64_t i = 0;
    auto cut = [&](int64_t end, int64_t step, int64_t seg) {
        for (; i < end; i += step) s.wch.push_back({i, std::min(end, i + step), seg});
        i = end;
    };
    for (int64_t q = 0; q < static_cast<int64_t>(s.segs.size()); ++q) {
        const LoraPart& p = lin.parts[s.segs[q].part];
        cut(p.out0, per, -1);
        cut(p.out1, aligned, q);
    }
    cut(lin.d_out, per, -1);
}

}  // namespace

void linear_run(const Linear& lin, const LinearCall& call, int threads) {
    thread_local Scratch s;
    int64_t xs = 0;
    const float* x = prologue(lin, call, s.x, xs);
    route(lin, call, s);
    if (!s.rows.empty() && s.h.size() < static_cast<size_t>(call.T * lin.rank))
        s.h.resize(static_cast<size_t>(call.T * lin.rank));
    const int64_t nb = lin.d_in / QK;
    const XRow* xq = is_block(lin.fmt) ? quantize_rows(x, xs, call.T, nb, is_paired(lin.fmt), s.xq, s.xrows) : nullptr;
    const XRow* xe = nullptr;                  // q8_0 experts' activations: W's when unpaired
    if (lin.efmt == FMT_Q8_0 && !s.rows.empty())
        xe = xq && !is_paired(lin.fmt) ? xq : quantize_rows(x, xs, call.T, nb, false, s.xe, s.xerows);
    const int64_t bytes = g_chunk_bytes.load(std::memory_order_relaxed);
    const int64_t na = static_cast<int64_t>(s.rows.size());
    const QrowsTiles tiles = xq && has_tiles(lin.fmt) && call.T >= tile_min_tokens(lin.fmt) ? qrows_tiles_kernel() : nullptr;
    int64_t per_w = std::max({int64_t(1), bytes / lin.row_bytes, ceil_div(lin.d_out, kMaxChunks / 2)});
    const HrowsTiles htiles =
        lin.fmt == FMT_BF16 && lin.half_tiles && call.T >= HALF_TILE_MIN ? hrows_tiles_kernel() : nullptr;
    if (tiles || htiles) per_w = round_up(per_w, TILE_ROWS);    // whole tiles (the part edges: multiples of 16)
    const int64_t per_a = std::max({int64_t(1), bytes / std::max<int64_t>(1, lin.a_row_bytes), ceil_div(na, kMaxChunks / 4)});
    split_w(lin, per_w, s);
    const XTiles xt = tiles ? pack_tiles(xq, call.T, nb, is_paired(lin.fmt), s.tq, s.td, s.ts) : XTiles{};
    const uint16_t* xb = htiles ? pack_htiles(x, xs, call.T, lin.d_in, s.hb) : nullptr;
    Job job{lin, call, x, xs, xq, xe, (xq || xe) ? qrows_dots_kernel() : nullptr, hrows_dots_kernel(), tiles, xt,
            htiles, xb, nb, s.h.data(),
            s.rows.data(), na, per_a, s.segs.data(), s.wch.data(), s.act.data(), nullptr, nullptr, 0, nullptr, 0,
            nullptr, nullptr};
    if (lin.efmt == FMT_Q8_0 && na > 0) {
        job.hws = prepare_panels(lin, call.T, s);
        job.panels = s.panels.data();
        job.hw = s.hw.data();
        job.sh = s.sh.data();
        job.nact = static_cast<int64_t>(s.act.size());
        job.expand_q8 = expand_q8_kernel();
    }
    run_job(lin, job, static_cast<int64_t>(s.wch.size()), threads);
}

Chunking chunking() { return {g_chunk_bytes.load()}; }

void set_chunking(const Chunking& c) { g_chunk_bytes.store(std::max<int64_t>(1, c.bytes)); }

}  // namespace pf_cpu
