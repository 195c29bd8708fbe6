// Decode-specialised grouped LoRA: y[t] += sum_k g[t,k] * s_k * B_k (A_k x[t]).
//
// Shapes (row-major, unit stride along the last dimension, row strides given in elements):
//   x [T, d_in], y [T, d_out], a [R, d_in] (A_cat), b [d_out, R] (B_cat): one dtype (fp32/fp16/bf16)
//   gates [T, K] fp32, scalings [K] fp32, h [min(T, kMaxTokens), R] fp32 scratch
//   rank_offsets [K+1]: expert k owns rows/columns rank_offsets[k] .. rank_offsets[k+1]-1
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace pf {

constexpr int kMaxExperts = 64;      // rank offsets travel by value in the kernel parameters
constexpr int kMaxTokens = 16;       // tokens per launch pair; more tokens loop on the host
constexpr int kSharedBudget = 44 * 1024;   // h in dynamic shared memory, under the 48 KiB default

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct GroupedLoRAParams {
  void* y;
  const void* x;
  const void* a;
  const void* b;
  const float* gates;
  const float* scalings;
  float* h;
  int T;                 // tokens in this launch (<= kMaxTokens)
  int d_in, d_out, K, R;
  int64_t stride_y, stride_x, stride_a, stride_b, stride_g;
  int rank_offsets[kMaxExperts + 1];
};

// Runs the shrink and expand kernels on `stream` for all T tokens (chunks of kMaxTokens).
// `vectorised` selects 16-byte loads (the caller checked alignment).  On failure returns the
// error and sets *what to the name of the call or kernel that failed.
cudaError_t launch_grouped_lora(GroupedLoRAParams p, int total_tokens, int dtype, bool vectorised,
                                cudaStream_t stream, const char** what);

// Bytes per element of a dtype code, 0 for an unknown code.
int dtype_size(int dtype);

}  // namespace pf
