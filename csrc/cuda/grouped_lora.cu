// Decode-specialised grouped LoRA for small T: memory-bound, so the design is about bytes.
//
//   shrink  h[t, j] = g[t, k(j)] s_k(j) * (A_cat[j] . x[t])       one block per rank row j
//   expand  y[t, n] += sum_j h[t, j] B_cat[n, j]                    one thread per output row n
//
// Each row of A_cat and of B_cat belonging to an active expert (a nonzero gate for some token of
// the chunk) is read exactly once, with 16-byte vector loads; inactive experts' rows are never
// read (the shrink writes zeros for them and the expand skips their columns).  All T (<= 16)
// tokens are accumulated in registers against the one read of each weight row.  Two launches on
// the caller's stream (the expand needs every h), no atomics, so the result is deterministic.
#include "grouped_lora.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pf {
namespace {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Loads VEC consecutive elements as floats: one 16-byte load when VEC * sizeof(T) == 16.
template <typename T, int VEC>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_float(p[0]);
  } else {
    static_assert(VEC * sizeof(T) == 16, "vector loads are 16 bytes");
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = to_float(e[i]);
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

__device__ __forceinline__ int expert_of_row(const GroupedLoRAParams& p, int j) {
  int k = 0;
  while (k + 1 < p.K && j >= p.rank_offsets[k + 1]) ++k;
  return k;
}

constexpr int kShrinkThreads = 128;  // one block per rank row: 4 warps split d_in
constexpr int kExpandThreads = 64;   // output rows per block of the expand

// grid: R blocks of kShrinkThreads threads; block j computes h[:, j].
template <typename T, int VEC, int MAXT>
__global__ void __launch_bounds__(kShrinkThreads) shrink_kernel(const GroupedLoRAParams p) {
  constexpr int kWarps = kShrinkThreads / 32;
  __shared__ float partial[kWarps][MAXT];
  const int j = blockIdx.x;
  const int k = expert_of_row(p, j);
  const float s = p.scalings[k];
  bool any = false;                             // the same in every thread of the block
  for (int t = 0; t < p.T; ++t) any |= p.gates[t * p.stride_g + k] * s != 0.f;
  if (!any) {                                   // inactive expert: A_cat[j] is never read
    if (threadIdx.x < p.T) p.h[threadIdx.x * p.R + j] = 0.f;
    return;
  }
  const T* a_row = static_cast<const T*>(p.a) + j * p.stride_a;
  const T* x = static_cast<const T*>(p.x);
  float acc[MAXT];
#pragma unroll
  for (int t = 0; t < MAXT; ++t) acc[t] = 0.f;
  for (int c = threadIdx.x * VEC; c < p.d_in; c += kShrinkThreads * VEC) {
    float av[VEC];
    load_vec<T, VEC>(a_row + c, av);
#pragma unroll
    for (int t = 0; t < MAXT; ++t) {
      if (t < p.T) {
        float xv[VEC];
        load_vec<T, VEC>(x + t * p.stride_x + c, xv);
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[t] = fmaf(av[i], xv[i], acc[t]);
      }
    }
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int t = 0; t < MAXT; ++t) {
    const float v = warp_sum(acc[t]);
    if (lane == 0) partial[warp][t] = v;
  }
  __syncthreads();
  const int t = threadIdx.x;
  if (t < p.T) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) v += partial[w][t];
    p.h[t * p.R + j] = v * p.gates[t * p.stride_g + k] * s;
  }
}

// grid: cdiv(d_out, kExpandThreads) blocks; dynamic shared memory T * R floats (h).
template <typename T, int VEC, int MAXT>
__global__ void __launch_bounds__(kExpandThreads) expand_kernel(const GroupedLoRAParams p) {
  extern __shared__ float h_s[];               // (T, R)
  __shared__ int active[kMaxExperts];
  for (int i = threadIdx.x; i < p.T * p.R; i += blockDim.x) h_s[i] = p.h[i];
  for (int k = threadIdx.x; k < p.K; k += blockDim.x) {
    bool any = false;
    for (int t = 0; t < p.T; ++t) any |= p.gates[t * p.stride_g + k] != 0.f;
    active[k] = any && p.scalings[k] != 0.f;
  }
  __syncthreads();
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= p.d_out) return;
  const T* b_row = static_cast<const T*>(p.b) + n * p.stride_b;
  float acc[MAXT];
#pragma unroll
  for (int t = 0; t < MAXT; ++t) acc[t] = 0.f;
  for (int k = 0; k < p.K; ++k) {
    if (!active[k]) continue;                   // inactive expert: its B columns are never read
    for (int c = p.rank_offsets[k]; c < p.rank_offsets[k + 1]; c += VEC) {
      float bv[VEC];
      load_vec<T, VEC>(b_row + c, bv);
#pragma unroll
      for (int t = 0; t < MAXT; ++t) {
        if (t < p.T) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[t] = fmaf(h_s[t * p.R + c + i], bv[i], acc[t]);
        }
      }
    }
  }
  T* y = static_cast<T*>(p.y);
#pragma unroll
  for (int t = 0; t < MAXT; ++t) {
    if (t < p.T) {
      T* out = y + t * p.stride_y + n;
      *out = from_float<T>(to_float(*out) + acc[t]);
    }
  }
}

template <typename T, int VEC, int MAXT>
cudaError_t launch_chunk(const GroupedLoRAParams& p, cudaStream_t stream, const char** what) {
  shrink_kernel<T, VEC, MAXT><<<p.R, kShrinkThreads, 0, stream>>>(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    *what = "shrink_kernel launch";
    return err;
  }
  const size_t smem = sizeof(float) * p.T * p.R;
  const int expand_blocks = (p.d_out + kExpandThreads - 1) / kExpandThreads;
  expand_kernel<T, VEC, MAXT><<<expand_blocks, kExpandThreads, smem, stream>>>(p);
  err = cudaGetLastError();
  if (err != cudaSuccess) *what = "expand_kernel launch";
  return err;
}

template <typename T, int VEC>
cudaError_t launch_tokens(const GroupedLoRAParams& p, cudaStream_t stream, const char** what) {
  if (p.T <= 1) return launch_chunk<T, VEC, 1>(p, stream, what);
  if (p.T <= 2) return launch_chunk<T, VEC, 2>(p, stream, what);
  if (p.T <= 4) return launch_chunk<T, VEC, 4>(p, stream, what);
  if (p.T <= 8) return launch_chunk<T, VEC, 8>(p, stream, what);
  return launch_chunk<T, VEC, kMaxTokens>(p, stream, what);
}

template <typename T>
cudaError_t launch_typed(const GroupedLoRAParams& p, bool vectorised, cudaStream_t stream,
                         const char** what) {
  constexpr int kVec = 16 / sizeof(T);
  return vectorised ? launch_tokens<T, kVec>(p, stream, what) : launch_tokens<T, 1>(p, stream, what);
}

}  // namespace

int dtype_size(int dtype) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat16: return 2;
    case kBFloat16: return 2;
    default: return 0;
  }
}

cudaError_t launch_grouped_lora(GroupedLoRAParams p, int total_tokens, int dtype, bool vectorised,
                                cudaStream_t stream, const char** what) {
  const int esize = dtype_size(dtype);
  for (int t0 = 0; t0 < total_tokens; t0 += kMaxTokens) {
    GroupedLoRAParams c = p;
    c.T = total_tokens - t0 < kMaxTokens ? total_tokens - t0 : kMaxTokens;
    c.x = static_cast<const char*>(p.x) + t0 * p.stride_x * esize;
    c.y = static_cast<char*>(p.y) + t0 * p.stride_y * esize;
    c.gates = p.gates + t0 * p.stride_g;
    cudaError_t err = cudaSuccess;
    switch (dtype) {
      case kFloat32: err = launch_typed<float>(c, vectorised, stream, what); break;
      case kFloat16: err = launch_typed<__half>(c, vectorised, stream, what); break;
      case kBFloat16: err = launch_typed<__nv_bfloat16>(c, vectorised, stream, what); break;
      default: *what = "dtype dispatch"; return cudaErrorInvalidValue;
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace pf
