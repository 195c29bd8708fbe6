// quant.h's qrows_dots for one instruction set: build.py compiles this file once per variant of
// isa.h, with -DPF_ISA=<name> and that variant's flags; isa.cpp picks one at run time.
#include "quant.h"

namespace pf_cpu {
namespace PF_ISA {

void qrows_dots_isa(int fmt, const uint8_t* w, int64_t rb, int64_t R, const XRow* X, int T, int64_t nb,
                    float* out, int64_t os) {
    qrows_dots(fmt, w, rb, R, X, T, nb, out, os);
}

}  // namespace PF_ISA
}  // namespace pf_cpu
