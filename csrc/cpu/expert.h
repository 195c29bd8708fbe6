// The persona experts' formats: how A_cat's rows and B are stored, and the f32 / bf16 expand's
// inner loop.  Header-only (AVX2/FMA/F16C), no checks, like kernels.h.
//
// The experts of a Linear (linear_plan.h) are stored in one format, chosen at load
// (pf_engine/backends/cpu/experts.py), for both of their matrices:
//
//   format     A_cat row r (d_in values)                B of a part (dp output columns)
//   FMT_F32    d_in floats                              B^T: a row of dp floats per rank row
//   FMT_BF16   d_in bf16 (half.h)                        B^T: dp32 = round_up(dp, 32) bf16 a
//                                                        rank row, zero padded
//   FMT_Q8_0   a q8_0 row of d_in (quant.h's RowLayout)  panels: per block (one expert's n rank
//                                                        rows), ceil(dp / 8) groups of 8 columns,
//                                                        each an fp32 scale s and nq = ceil(n / 4)
//                                                        quads of 32 int8: quad k holds
//                                                        B[8g + i, 4k + j] / s at 4 i + j (zero
//                                                        padded); s = max |B| over the group / 127
//
// A_cat's rows are dotted like a base weight of that format (hrows_dots; qrows_dots against x
// quantized per block, as llama.cpp dots Q8_0 weights).  The f32 / bf16 expand streams B^T's
// rows:
//
//   expand<EF, N>(a, row, stride, off, n, y)   y[k] += sum_{i<N} a[i] B^T_i[off + k],  k < n
//
// for N rank rows at row + i * stride bytes, columns off:off + n of the part.  The q8 expand is
// an integer dot of each group's quads with h quantized per token and block (expand_q8.h,
// compiled per instruction set): 4 rank rows and 8 columns per vpdpbusd.
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "quant_format.h"
#include "simd.h"

namespace pf_cpu {

constexpr int64_t EXPERT_COL_ALIGN = 8;   // pass 2's column offsets in a part: multiples of this
                                          // (q8: one panel group)

// Eight values of a B^T row at column j, as floats.
template <int EF>
inline __m256 expert8(const uint8_t* row, int64_t j) {
    if constexpr (EF == FMT_F32) {
        return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + j);
    } else {                             // FMT_BF16
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * j));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
}

template <int EF>
inline float expert1(const uint8_t* row, int64_t j) {
    if constexpr (EF == FMT_F32) {
        return reinterpret_cast<const float*>(row)[j];
    } else {
        uint16_t b;
        std::memcpy(&b, row + 2 * j, 2);
        const uint32_t u = static_cast<uint32_t>(b) << 16;
        float f;
        std::memcpy(&f, &u, 4);
        return f;
    }
}

// y[k] += sum_i c[i] v_i[j0 + k] for k < n over N rows of one format, 8 columns at a time.
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

// y[k] += sum_{i<N} a[i] B^T_i[off + k] for k < n (see the file's comment), f32 or bf16.
template <int EF, int N>
inline void expand(const float* a, const uint8_t* row, int64_t stride, int64_t off, int64_t n, float* y) {
    static_assert(EF == FMT_F32 || EF == FMT_BF16, "q8 experts expand in expand_q8.h");
    const uint8_t* rows[N];
    for (int i = 0; i < N; ++i) rows[i] = row + i * stride;
    axpy_rows<EF, N>(a, rows, off, n, y);
}

}  // namespace pf_cpu
