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

// Decode dots reading weights from memory ask for the bytes kAheadBytes past those they are
// about to read: the hardware prefetchers alone kept the stream short of the read bandwidth.
// half.h asks for the 16-bit row 4 KB ahead before each row; kernels.h's dot_ahead (fp32) for one
// cache line per 16 values as it goes.  bench_ab in one run (bundled model, 2 threads, Intel Xeon
// with AMX): f16 decode 0.78-0.85x the time, bf16 0.82-0.86x, f32 0.81x (a whole fp32 row asked
// for at once: 1.00x).  The same for q4_1 rows (quant.h) gave 0.99x at 4 KB and 1.11x at 8 KB:
// not used there.  A prefetch never faults, so past a matrix's end it is harmless.
constexpr int64_t kAheadBytes = 4096;
inline void prefetch_bytes(const void* p, int64_t n) {
    const char* c = static_cast<const char*>(p);
    for (int64_t b = 0; b < n; b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

}  // namespace PF_ISA
using namespace PF_ISA;

// A pointer passed from Python as an integer (tensor.data_ptr()).
template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace pf_cpu
