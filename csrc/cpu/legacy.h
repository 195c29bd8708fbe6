// The old raw-pointer entry points (grouped_lora_cpu.cpp, decode_attention.cpp; OpenMP), kept
// beside the typed API until the engine switches over.  binding.cpp binds them into _pf_cpu.
#pragma once
#include <pybind11/pybind11.h>

// fused_linear, fused_linear_pe, decode_attention (the raw-pointer overload), cpu_supported,
// MAX_TOKENS (64).
void bind_legacy(pybind11::module_& m);
