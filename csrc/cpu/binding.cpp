// The _pf_cpu module: the old raw-pointer entry points (legacy.h).
#include "legacy.h"

PYBIND11_MODULE(_pf_cpu, m) {
    m.doc() = "csrc/cpu: fused grouped-LoRA linear and decode attention for CPU decode steps "
              "(AVX2/FMA, OpenMP)";
    bind_legacy(m);
}
