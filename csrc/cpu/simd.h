// Helpers shared by the csrc/cpu kernels (AVX2).
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace pf_cpu {

// The sum of the 8 lanes of v.
inline float hsum(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_hadd_ps(lo, lo);
    lo = _mm_hadd_ps(lo, lo);
    return _mm_cvtss_f32(lo);
}

// A pointer passed from Python as an integer (tensor.data_ptr()).
template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

}  // namespace pf_cpu
