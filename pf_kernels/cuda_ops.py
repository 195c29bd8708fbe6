"""The nvcc-built decode kernel (csrc/cuda/grouped_lora.cu), behind a guard that falls back.

The extension ``pf_kernels._pf_cuda`` exists only where setup.py (or ``python csrc/cuda/build.py``)
found nvcc.  :func:`cuda_available` says whether it can run here and, if not, why;
:func:`grouped_lora_cuda` raises RuntimeError with that reason instead of failing obscurely.
"""
from __future__ import annotations

import importlib

import torch

from .layout import RankLayout, check_scalings, host_rank_offsets
from .ops import grouped_shapes

__all__ = ["cuda_available", "grouped_lora_cuda"]

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


MIN_CAPABILITY = (8, 0)      # sm_80 SASS runs on 8.x, sm_90 SASS on 9.0, compute_90 PTX on newer


def _load():
    """(module, None) or (None, reason)."""
    try:
        return importlib.import_module("pf_kernels._pf_cuda"), None
    except ImportError as e:
        return None, (f"extension not built (pf_kernels._pf_cuda: {e}); "
                      "run python csrc/cuda/build.py with nvcc")


def _unavailable_reason():
    """(module, None) when the kernel can run here, else (None, reason)."""
    mod, reason = _load()
    if mod is None:
        return None, reason
    if not torch.cuda.is_available():
        return None, "no GPU (torch.cuda.is_available() is False)"
    try:
        n = mod.device_count()
    except RuntimeError as e:
        return None, f"CUDA runtime unusable for the extension: {e}"
    if n == 0:
        return None, "no GPU (cudaGetDeviceCount() found none)"
    cap = torch.cuda.get_device_capability()
    if cap < MIN_CAPABILITY:
        return None, (f"compute capability {cap[0]}.{cap[1]} is below "
                      f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}: the kernel is built as sm_80 / "
                      "sm_90 SASS plus compute_90 PTX (csrc/cuda/build.py)")
    return mod, None


def cuda_available() -> tuple[bool, str]:
    """(True, device name) when the CUDA kernel can run here, else (False, reason)."""
    mod, reason = _unavailable_reason()
    if mod is None:
        return False, reason
    return True, f"GPU: {torch.cuda.get_device_name()}"


def grouped_lora_cuda(y: torch.Tensor, x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor,
                      gates: torch.Tensor, rank_offsets, scalings: torch.Tensor) -> torch.Tensor:
    """Semantics: y[t] += sum_k gates[t, k] * scalings[k] * B_k (A_k x[t]); y modified in place.

    y [T, d_out], x [T, d_in], a_cat [R, d_in], b_cat [d_out, R]: one CUDA device, one dtype
    among fp16, bf16, fp32, unit stride along the last dimension (rows may be strided).
    gates [T, K] fp32, scalings [K] fp32 on the same device; rank_offsets [K+1] int, K <= 64, read
    on the host (a CPU tensor or list: a CUDA tensor costs a sync, which graph capture forbids).
    Decode-specialised: tokens go 16 at a time, each chunk reading the active experts' A and B
    rows once.  Returns y.
    """
    mod, reason = _unavailable_reason()
    if mod is None:
        raise RuntimeError(f"the CUDA grouped-LoRA kernel is unavailable: {reason}")
    named = {"y": y, "x": x, "a_cat": a_cat, "b_cat": b_cat, "gates": gates}
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, "
                             f"got shape {tuple(getattr(t, 'shape', ()))}")
        if t.device.type != "cuda" or t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but must be on x's CUDA device {x.device}")
        if t.stride(1) != 1 and t.shape[1] > 1:
            raise ValueError(f"{name} must have unit stride along its last dimension, "
                             f"got strides {t.stride()}")
    if x.dtype not in _DTYPE_CODES:
        raise ValueError(f"x has dtype {x.dtype}; expected float16, bfloat16 or float32")
    for name in ("y", "a_cat", "b_cat"):
        if named[name].dtype != x.dtype:
            raise ValueError(f"{name} has dtype {named[name].dtype} but x has {x.dtype}")
    if gates.dtype != torch.float32:
        raise ValueError(f"gates must be float32, got {gates.dtype}")
    T, d_in, R, d_out = grouped_shapes(y, x, a_cat, b_cat)
    offsets = host_rank_offsets(rank_offsets)
    if isinstance(rank_offsets, RankLayout) and scalings is None:
        scalings = rank_offsets.scalings
    K = len(offsets) - 1
    check_scalings(scalings, K)
    if scalings.device != x.device:
        raise ValueError(f"scalings is on {scalings.device} "
                         f"but must be on x's CUDA device {x.device}")
    if offsets[-1] != R:
        raise ValueError(f"rank_offsets ends at {offsets[-1]} but a_cat has R={R} rows")
    if tuple(gates.shape) != (T, K):
        raise ValueError(f"gates has shape {tuple(gates.shape)} but (T, K) = ({T}, {K})")
    if T == 0 or R == 0:
        return y
    h = torch.empty(min(T, mod.MAX_TOKENS_PER_LAUNCH), R, device=x.device, dtype=torch.float32)
    scal = scalings.contiguous()
    stream = torch.cuda.current_stream(x.device).cuda_stream
    mod.grouped_lora(y.data_ptr(), x.data_ptr(), a_cat.data_ptr(), b_cat.data_ptr(),
                     gates.data_ptr(),
                     scal.data_ptr(), h.data_ptr(), T, d_in, d_out, offsets,
                     y.stride(0), x.stride(0), a_cat.stride(0), b_cat.stride(0), gates.stride(0),
                     _DTYPE_CODES[x.dtype], stream, x.device.index)
    return y
