// pybind11 module _pf_cuda: the decode grouped-LoRA kernel behind raw device pointers.
//
// Not a torch CUDAExtension (a CPU torch refuses to build one): the Python side (pf_kernels.cuda_ops)
// passes tensor.data_ptr() integers, shapes, row strides (elements) and a dtype code, and this
// module checks every value at the boundary and every CUDA call, raising RuntimeError with the
// name of what failed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "grouped_lora.h"

namespace py = pybind11;

namespace {

std::string cuda_message(const char* call, cudaError_t err) {
  return std::string(call) + " failed: " + cudaGetErrorName(err) + ": " + cudaGetErrorString(err);
}

#define PF_CUDA_CHECK(call)                                            \
  do {                                                                 \
    const cudaError_t err_ = (call);                                   \
    if (err_ != cudaSuccess) throw std::runtime_error(cuda_message(#call, err_)); \
  } while (0)

#define PF_CHECK(cond, msg)                                            \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::ostringstream os_;                                          \
      os_ << msg;                                                      \
      throw std::runtime_error(os_.str());                             \
    }                                                                  \
  } while (0)

int device_count() {
  int n = 0;
  PF_CUDA_CHECK(cudaGetDeviceCount(&n));
  return n;
}

// Restores the calling thread's current device on scope exit.
struct DeviceGuard {
  int previous = -1;
  explicit DeviceGuard(int device) {
    PF_CUDA_CHECK(cudaGetDevice(&previous));
    if (previous != device) PF_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous) cudaSetDevice(previous);
  }
};

bool aligned16(std::uintptr_t ptr) { return ptr % 16 == 0; }

void grouped_lora(std::uintptr_t y, std::uintptr_t x, std::uintptr_t a, std::uintptr_t b,
                  std::uintptr_t gates, std::uintptr_t scalings, std::uintptr_t h, int T, int d_in,
                  int d_out, const std::vector<int>& rank_offsets, std::int64_t stride_y,
                  std::int64_t stride_x, std::int64_t stride_a, std::int64_t stride_b,
                  std::int64_t stride_g, int dtype, std::uintptr_t stream, int device) {
  const int esize = pf::dtype_size(dtype);
  PF_CHECK(esize != 0, "no kernel for dtype code=" << dtype << " (expected 0=float32, 1=float16, 2=bfloat16)");
  PF_CHECK(T >= 0 && d_in > 0 && d_out > 0,
           "bad sizes: T=" << T << " d_in=" << d_in << " d_out=" << d_out << " (need T >= 0, d_in > 0, d_out > 0)");
  const int K = static_cast<int>(rank_offsets.size()) - 1;
  PF_CHECK(K >= 1 && K <= pf::kMaxExperts,
           "rank_offsets has " << rank_offsets.size() << " entries; expected K+1 with 1 <= K <= " << pf::kMaxExperts);
  PF_CHECK(rank_offsets[0] == 0, "rank_offsets[0]=" << rank_offsets[0] << " but must be 0");
  for (int k = 0; k < K; ++k)
    PF_CHECK(rank_offsets[k + 1] >= rank_offsets[k],
             "rank_offsets decreases at k=" << k << ": " << rank_offsets[k] << " > " << rank_offsets[k + 1]);
  const int R = rank_offsets[K];
  if (T == 0 || R == 0) return;
  PF_CHECK(y && x && a && b && gates && scalings && h, "null device pointer among y, x, a, b, gates, scalings, h");
  PF_CHECK(stride_y >= d_out && stride_x >= d_in && stride_a >= d_in && stride_b >= R && stride_g >= K,
           "row strides too small: stride_y=" << stride_y << " (d_out=" << d_out << "), stride_x=" << stride_x
           << " (d_in=" << d_in << "), stride_a=" << stride_a << ", stride_b=" << stride_b << " (R=" << R
           << "), stride_g=" << stride_g << " (K=" << K << ")");
  const int tokens_per_launch = T < pf::kMaxTokens ? T : pf::kMaxTokens;
  PF_CHECK(static_cast<std::int64_t>(tokens_per_launch) * R * 4 <= pf::kSharedBudget,
           "R=" << R << " rank rows need " << tokens_per_launch * R * 4 << " bytes of shared memory for h; the limit is "
           << pf::kSharedBudget);

  pf::GroupedLoRAParams p{};
  p.y = reinterpret_cast<void*>(y);
  p.x = reinterpret_cast<const void*>(x);
  p.a = reinterpret_cast<const void*>(a);
  p.b = reinterpret_cast<const void*>(b);
  p.gates = reinterpret_cast<const float*>(gates);
  p.scalings = reinterpret_cast<const float*>(scalings);
  p.h = reinterpret_cast<float*>(h);
  p.T = T;
  p.d_in = d_in;
  p.d_out = d_out;
  p.K = K;
  p.R = R;
  p.stride_y = stride_y;
  p.stride_x = stride_x;
  p.stride_a = stride_a;
  p.stride_b = stride_b;
  p.stride_g = stride_g;
  for (int k = 0; k <= K; ++k) p.rank_offsets[k] = rank_offsets[k];

  // 16-byte loads need 16-byte aligned rows and segments: base pointers, row strides, d_in and
  // every rank offset must be multiples of the vector width.
  const int vec = 16 / esize;
  bool vectorised = aligned16(x) && aligned16(a) && aligned16(b) && d_in % vec == 0 &&
                    stride_x % vec == 0 && stride_a % vec == 0 && stride_b % vec == 0;
  for (int k = 0; k <= K; ++k) vectorised = vectorised && rank_offsets[k] % vec == 0;

  DeviceGuard guard(device);
  const char* what = "launch";
  const cudaError_t err = pf::launch_grouped_lora(p, T, dtype, vectorised,
                                                  reinterpret_cast<cudaStream_t>(stream), &what);
  if (err != cudaSuccess) throw std::runtime_error(cuda_message(what, err));
}

}  // namespace

PYBIND11_MODULE(_pf_cuda, m) {
  m.doc() = "PersonaFuse decode grouped-LoRA CUDA kernel (device pointers in, y updated in place)";
  m.def("device_count", &device_count, "cudaGetDeviceCount(); raises RuntimeError when CUDA is unusable");
  m.def("grouped_lora", &grouped_lora,
        "y[t] += sum_k g[t,k] s_k B_k (A_k x[t]) for T tokens, on `stream` (a cudaStream_t as int)",
        py::arg("y"), py::arg("x"), py::arg("a"), py::arg("b"), py::arg("gates"), py::arg("scalings"),
        py::arg("h"), py::arg("T"), py::arg("d_in"), py::arg("d_out"), py::arg("rank_offsets"),
        py::arg("stride_y"), py::arg("stride_x"), py::arg("stride_a"), py::arg("stride_b"),
        py::arg("stride_g"), py::arg("dtype"), py::arg("stream"), py::arg("device"));
  m.attr("MAX_TOKENS_PER_LAUNCH") = pf::kMaxTokens;
  m.attr("SHARED_BUDGET") = pf::kSharedBudget;
  m.attr("MAX_EXPERTS") = pf::kMaxExperts;
}
