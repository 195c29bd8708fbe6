// quant.h's qrows_dots, half.h's hrows_dots, expand_q8.h's expand (and amx.h's and amx_bf16.h's
// tiles in the amx variant) for one instruction set: build.py compiles this file once per variant of
// isa.h, with -DPF_ISA=<name> and that variant's flags; isa.cpp picks one at run time.
#include "amx.h"
#include "amx_bf16.h"
#include "expand_q8.h"
#include "half.h"
#include "quant.h"

namespace pf_cpu {
namespace PF_ISA {

void qrows_dots_isa(int fmt, const uint8_t* w, int64_t rb, int64_t R, const XRow* X, int T, int64_t nb,
                    float* out, int64_t os) {
    qrows_dots(fmt, w, rb, R, X, T, nb, out, os);
}

void hrows_dots_isa(int fmt, const uint8_t* w, int64_t rb, int64_t R, const float* x, int64_t xs, int T, int64_t d,
                    float* out, int64_t os) {
    hrows_dots(fmt, w, rb, R, x, xs, T, d, out, os);
}

void expand_q8_isa(const PanelBlock* blk, int nblk, int64_t g0, int64_t g1, const int32_t* hw, int64_t hws,
                   const float* sh, int64_t shs, int T, float* y, int64_t ys, int64_t valid) {
    expand_q8(blk, nblk, g0, g1, hw, hws, sh, shs, T, y, ys, valid);
}

#if defined(__AMX_INT8__)
void qrows_tiles_isa(int fmt, const uint8_t* w, int64_t rb, int64_t R, const XTiles& xt, int64_t G, int T,
                     float* out, int64_t os) {
    qrows_tiles(fmt, w, rb, R, xt, G, T, out, os);
}

void hrows_tiles_isa(const uint8_t* w, int64_t rb, int64_t R, const uint16_t* xb, int64_t G, int T, int64_t d,
                     float* out, int64_t os) {
    hrows_tiles(w, rb, R, xb, G, T, d, out, os);
}
#endif

}  // namespace PF_ISA
}  // namespace pf_cpu
