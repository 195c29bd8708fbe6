"""pf_kernels: fused grouped-LoRA kernels for mixtures of LoRA persona experts.

For T tokens and K experts with ranks r_k stacked into R = sum r_k rows:

    y[t] (+)= sum_k g[t, k] * s_k * B_k (A_k x[t])      A_cat [R, d_in], B_cat [d_out, R]

Layers, as in the kernel libraries this follows:
    reference   plain torch (fp64 accumulate): what every backend is tested against
    layout      RankLayout: how the experts' ranks stack into A_cat / B_cat
    meta        LoRAMeta: active (token, expert) pairs grouped by expert, built once per step
    ops         Triton launchers: grouped_lora (y += delta), fused_linear ([W; A_cat] in one GEMM)
    cuda_ops    the optional nvcc-built decode kernel (csrc/cuda/), behind a guard that falls back

Importing this package never imports triton or the CUDA extension; they load at first use.
"""
from . import cuda_ops, reference
from .layout import RankLayout
from .meta import LoRAMeta, bank_layout
from .ops import DECODE_MAX_TOKENS, available, fused_linear, grouped_lora

__all__ = ["DECODE_MAX_TOKENS", "LoRAMeta", "RankLayout", "available", "bank_layout",
           "cuda_ops",
           "fused_linear", "grouped_lora", "reference"]
