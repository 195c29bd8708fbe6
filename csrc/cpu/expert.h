// The persona experts' formats: how A_cat's rows and B^T's rows are stored, and the expand's
// inner loop for each.  Header-only (AVX2/FMA/F16C), no checks, like kernels.h.
//
// The experts of a Linear (linear_plan.h) are stored in one format, chosen at load
// (pf_engine/backends/cpu/experts.py), for both of their matrices:
//
//   format     A_cat row r (d_in values)                B^T row r of a part (dp columns)
//   FMT_F32    d_in floats                              dp floats
//   FMT_BF16   d_in bf16 (half.h)                        dp32 = round_up(dp, 32) bf16, zero padded
//   FMT_Q8_0   a q8_0 row of d_in (quant.h's RowLayout)  a q8_0 row of dp32 values, zero padded:
//                                                        32 columns share one fp16 scale
//
// A_cat's rows are dotted like a base weight of that format (hrows_dots; qrows_dots against x
// quantized per block, as llama.cpp dots Q8_0 weights).  The expand streams B^T's rows:
//
//   expand<EF, N>(a, row, stride, off, n, y)   y[k] += sum_{i<N} a[i] B^T_i[off + k],  k < n
//
// for N rank rows at row + i * stride bytes, columns off:off + n of the part.  With FMT_Q8_0
// ``off`` is a multiple of 8, so that 8 columns never straddle two scales (linear_plan.cpp
// aligns pass 2's column chunks to that).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "quant_format.h"
#include "simd.h"

namespace pf_cpu {

constexpr int64_t EXPERT_COL_ALIGN = 8;   // pass 2's column offsets in a part: multiples of this

// Eight values of a B^T row at column j, as floats.
template <int EF>
inline __m256 expert8(const uint8_t* row, int64_t j) {
    if constexpr (EF == FMT_F32) {
        return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + j);
    } else if constexpr (EF == FMT_BF16) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * j));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {                             // FMT_Q8_0: the row's q field (caller's offset)
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j));
        return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    }
}

template <int EF>
inline float expert1(const uint8_t* row, int64_t j) {
    if constexpr (EF == FMT_F32) {
        return reinterpret_cast<const float*>(row)[j];
    } else if constexpr (EF == FMT_BF16) {
        uint16_t b;
        std::memcpy(&b, row + 2 * j, 2);
        const uint32_t u = static_cast<uint32_t>(b) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    } else {
        return static_cast<float>(reinterpret_cast<const int8_t*>(row)[j]);
    }
}

// y[k] += sum_i c[i] v_i[j0 + k] for k < n over N rows of one format whose values need no
// per-column scale (c: the coefficients already scaled), 8 columns at a time.
template <int EF, int N>
inline void axpy_rows(const float* c, const uint8_t* const* rows, int64_t j0, int64_t n, float* y) {
    __m256 cv[N];
    for (int i = 0; i < N; ++i) cv[i] = _mm256_set1_ps(c[i]);
    int64_t k = 0;
    for (; k + 8 <= n; k += 8) {
        __m256 v = _mm256_loadu_ps(y + k);
        for (int i = 0; i < N; ++i) v = _mm256_fmadd_ps(cv[i], expert8<EF>(rows[i], j0 + k), v);
        _mm256_storeu_ps(y + k, v);
    }
    for (; k < n; ++k) {
        float s = 0.0f;
        for (int i = 0; i < N; ++i) s += c[i] * expert1<EF>(rows[i], j0 + k);
        y[k] += s;
    }
}

// y[k] += sum_{i<N} a[i] B^T_i[off + k] for k < n (see the file's comment); ``vals``: the byte
// offset of a row's values (FMT_Q8_0: RowLayout's q, its fp16 scales at offset 0; else 0).
template <int EF, int N>
inline void expand(const float* a, const uint8_t* row, int64_t stride, int64_t vals, int64_t off, int64_t n,
                   float* y) {
    const uint8_t* rows[N];
    for (int i = 0; i < N; ++i) rows[i] = row + i * stride + vals;
    if constexpr (EF != FMT_Q8_0) {
        axpy_rows<EF, N>(a, rows, off, n, y);
    } else {
        int64_t k = 0;
        while (k < n) {                                            // one scale's columns at a time
            const int64_t b = (off + k) / QK, e = std::min(n, (b + 1) * QK - off);
            float c[N];
            for (int i = 0; i < N; ++i)
                c[i] = a[i] * _cvtsh_ss(reinterpret_cast<const uint16_t*>(row + i * stride)[b]);
            axpy_rows<EF, N>(c, rows, off + k, e - k, y + k);
            k = e;
        }
    }
}

}  // namespace pf_cpu
