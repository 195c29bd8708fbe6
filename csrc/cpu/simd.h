// Helpers shared by the csrc/cpu kernels (AVX2).
//
// PF_ISA names the instruction set a translation unit is compiled for (isa.h): avx2, the
// baseline, unless build.py compiles quant_dots.cpp for a wider one.  The headers such a variant
// includes (simd.h, quant.h) put their functions in namespace pf_cpu::PF_ISA, so that a
// variant's inline copies never merge with the baseline's at link time (the linker keeps one
// copy of each inline function: a baseline caller must never get an AVX-512 one; build.py
// checks each variant's object defines nothing outside its namespace).
#pragma once
#include <immintrin.h>

#include <cstdint>

#ifndef PF_ISA
#define PF_ISA avx2
#endif

namespace pf_cpu {
namespace PF_ISA {

// The sum of the 8 lanes of v.
inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

}  // namespace PF_ISA
using namespace PF_ISA;

// A pointer passed from Python as an integer (tensor.data_ptr()).
template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace pf_cpu
