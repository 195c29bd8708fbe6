"""Launchers for the Triton grouped-LoRA kernels (layer 2 of 3): check, allocate, launch.

Kernels: _triton_kernels.py.  References: reference.py.  Notation: reference.py's docstring.

Sparsity.  Only active (token, expert) pairs, gates[t, k] != 0, read their expert's weights:
  * decode (T <= DECODE_MAX_TOKENS): one launch; each program loops over the experts and skips
    every expert whose gates are zero for all tokens of its block;
  * prefill: an expert-major shrink over the active pairs (LoRAMeta: tokens grouped by expert),
    then a token-major expand that skips experts inactive in its token block;
  * fused_linear: one GEMM over W_aug = [W; A_cat] whose LoRA column tiles skip the GEMM when
    their gates are all zero, then the same expand.

Ranks need no padding: rank tiles are max(16, next_pow2(max r_k)) wide, loaded under a mask.
"""
from __future__ import annotations

import contextlib

import torch

from .meta import LoRAMeta, RankLayout, bank_layout

__all__ = ["DECODE_MAX_TOKENS", "available", "grouped_lora", "fused_linear", "block_config",
           "rank_tile"]

DECODE_MAX_TOKENS = 16          # at or below this many tokens grouped_lora runs its one-launch path
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def on_device(x: torch.Tensor):
    """The launches' device guard: a Triton kernel launches on the *current* CUDA device, so
    tensors on cuda:1 in a process whose current device is 0 would be launched on the wrong GPU.
    Every launcher below runs its launches inside this context; off CUDA it does nothing."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _interpreting() -> bool:
    try:
        from ._triton_kernels import interpreting
    except ImportError:
        return False
    return interpreting()


def available() -> tuple[bool, str]:
    """(True, how) when the Triton kernels can run here, else (False, why not)."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return False, f"triton is not installed ({e})"
    if _interpreting():
        return True, "TRITON_INTERPRET=1: kernels run on CPU tensors in Triton's interpreter"
    if torch.cuda.is_available():
        return True, f"GPU: {torch.cuda.get_device_name()}"
    return False, "no GPU (torch.cuda.is_available() is False) and TRITON_INTERPRET is not 1"


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


BR_MAX = 64                   # widest rank tile; larger ranks are walked in chunks of it
SMEM_LIMIT = 99 * 1024        # shared memory per block on sm_86 / sm_89, the smallest of 8.x-9.0


def rank_tile(max_rank: int) -> int:
    """BR: the rank tile, >= 16 for tl.dot, <= BR_MAX so shared memory is bounded."""
    return min(BR_MAX, max(16, _next_pow2(max_rank)))


def block_config(kind: str, T: int, d_in: int, d_out: int, interpret: bool, esize: int = 2) -> dict:
    """Block sizes and pipeline stages for ``kind`` in {"fused", "shrink", "expand", "linear"}.

    The interpreter runs each program in numpy at a cost of milliseconds, so it gets big blocks;
    the GPU gets tensor-core-sized ones (every dot dimension >= 16) whose pipelined tiles fit
    SMEM_LIMIT with the rank tile at BR_MAX, for element size ``esize`` (4: fp32 halves BK; a
    test compiles every configuration for sm_80 and sm_86 and reads the shared memory it takes).
    """
    if interpret:
        bt = min(64, max(16, _next_pow2(T)))
        return dict(BT=bt, BM=bt, BN=min(512, max(16, _next_pow2(d_out))),
                    BK=min(512, max(16, _next_pow2(d_in))), num_warps=4, num_stages=1)
    wide = esize >= 4
    bt = 16 if T <= 16 else (32 if T <= 32 else 64)
    if kind == "fused":
        return dict(BT=16, BN=64, BK=64 if wide else 128, num_warps=4, num_stages=2 if wide else 3)
    if kind == "linear":
        return dict(BM=min(128, max(16, _next_pow2(T))), BN=128, BK=32 if wide else 64,
                    num_warps=8 if T > 64 else 4, num_stages=2 if wide else 3)
    return dict(BT=bt, BN=128, BK=32 if wide else 64, num_warps=4, num_stages=2 if wide else 3)


def _dot_flags(x: torch.Tensor, interpret: bool) -> dict:
    return dict(INTERP_BF16=interpret and x.dtype == torch.bfloat16,
                PREC="ieee" if x.dtype == torch.float32 else "tf32")


def _check_tensor(name: str, t, ndim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {what}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(t.shape)}")


def _check_same(x: torch.Tensor, named: dict[str, torch.Tensor]) -> None:
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; expected float16, bfloat16 or float32")
    for name, t in named.items():
        if t.dtype != x.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but x has {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _check_gates(gates, T: int, K: int, x: torch.Tensor) -> None:
    _check_tensor("gates", gates, 2, "[T, K]")
    if tuple(gates.shape) != (T, K):
        raise ValueError(f"gates has shape {tuple(gates.shape)} "
                         f"but (T, K) = ({T}, {K}) from x and rank_offsets")
    if gates.dtype != torch.float32:
        raise ValueError(f"gates must be float32, got {gates.dtype}")
    if gates.device != x.device:
        raise ValueError(f"gates is on {gates.device} but x is on {x.device}")


def _layout(gates, rank_offsets, scalings, meta: LoRAMeta | None, T: int, R: int,
            x: torch.Tensor) -> RankLayout:
    if meta is not None:
        if (meta.num_tokens, meta.num_experts, meta.total_rank) != (T, gates.shape[1], R):
            raise ValueError(f"meta was built for (T, K, R) = ({meta.num_tokens}, "
                             f"{meta.num_experts}, "
                             f"{meta.total_rank}) but the call has ({T}, {gates.shape[1]}, {R})")
        if meta.device != x.device:
            raise ValueError(f"meta is on {meta.device} but x is on {x.device}")
        return meta.layout
    if isinstance(scalings, torch.Tensor) and scalings.device != x.device:
        raise ValueError(f"scalings is on {scalings.device} but x is on {x.device}")
    layout = bank_layout(rank_offsets, scalings, x.device)
    if layout.total_rank != R:
        raise ValueError(f"rank_offsets ends at {layout.total_rank} "
                         f"but the bank has R={R} rank rows")
    return layout


def grouped_shapes(y, x, a_cat, b_cat) -> tuple[int, int, int, int]:
    """(T, d_in, R, d_out) of a grouped-LoRA call, or a ValueError naming both sizes."""
    T, d_in = x.shape
    R, d_out = a_cat.shape[0], y.shape[1]
    if y.shape[0] != T:
        raise ValueError(f"y has {y.shape[0]} rows but x has T={T}")
    if a_cat.shape[1] != d_in:
        raise ValueError(f"a_cat has d_in={a_cat.shape[1]} columns but x has d_in={d_in}")
    if tuple(b_cat.shape) != (d_out, R):
        raise ValueError(f"b_cat has shape {tuple(b_cat.shape)} "
                         f"but (d_out, R) = ({d_out}, {R}) from y and a_cat")
    return T, d_in, R, d_out


def _require_mode(x: torch.Tensor) -> bool:
    """Check that the kernels can run on x's device; returns True when interpreting."""
    interp = _interpreting()
    if x.device.type == "cpu" and not interp:
        raise RuntimeError("x is on cpu: the Triton kernels need CUDA tensors, "
                           "or TRITON_INTERPRET=1 "
                           "to run them on CPU tensors in the interpreter")
    if x.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"x is on {x.device}: the Triton kernels support cuda "
                           "(and cpu when interpreting)")
    if not interp:
        from ._triton_kernels import can_compile
        if not can_compile():
            raise RuntimeError("TRITON_INTERPRET is off now but was 1 when triton was imported: "
                               "triton's library functions are interpreted in this process, "
                               "so no kernel can compile")
    return interp


def grouped_lora(y: torch.Tensor, x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor,
                 gates: torch.Tensor, rank_offsets, scalings: torch.Tensor,
                 meta: LoRAMeta | None = None) -> torch.Tensor:
    """Semantics: y[t] += sum_k gates[t, k] * scalings[k] * B_k (A_k x[t]); y modified in place.

    y [T, d_out] and x [T, d_in], a_cat [R, d_in], b_cat [d_out, R]: one dtype among fp16, bf16,
    fp32 (accumulation is fp32), one device, any strides.  gates [T, K] fp32, scalings [K] fp32,
    rank_offsets [K+1] int (a CPU tensor or list: it is read on the host unless ``meta`` is given),
    or a RankLayout holding both (scalings None).
    meta: a LoRAMeta built from these gates (``LoRAMeta.build`` or ``refill_``); with it the call
    never synchronises with the host, so it can be captured in a CUDA graph.  Returns y.
    T <= DECODE_MAX_TOKENS: one launch (shrink + expand); else shrink over the active pairs, then
    expand.  Banks need no rank padding (the kernels pad rank tiles to >= 16 under a mask).
    """
    for name, t, what in (("y", y, "[T, d_out]"), ("x", x, "[T, d_in]"),
                          ("a_cat", a_cat, "[R, d_in]"),
                          ("b_cat", b_cat, "[d_out, R]")):
        _check_tensor(name, t, 2, what)
    _check_same(x, {"y": y, "a_cat": a_cat, "b_cat": b_cat})
    T, d_in, R, d_out = grouped_shapes(y, x, a_cat, b_cat)
    K = _num_experts(rank_offsets, meta)
    _check_gates(gates, T, K, x)
    layout = _layout(gates, rank_offsets, scalings, meta, T, R, x)
    interp = _require_mode(x)
    if T == 0 or R == 0 or d_out == 0:
        return y
    with on_device(x):
        _launch_grouped(y, x, a_cat, b_cat, gates, layout, meta, interp, T, d_in, d_out, K, R)
    return y


def _launch_grouped(y, x, a_cat, b_cat, gates, layout, meta, interp: bool, T: int, d_in: int,
                    d_out: int,
                    K: int, R: int) -> None:
    """grouped_lora's launches (its checks done, under its device guard)."""
    from . import _triton_kernels as tk
    br = rank_tile(layout.max_rank)
    flags = _dot_flags(x, interp)
    es = x.element_size()
    if T <= DECODE_MAX_TOKENS:
        cfg = block_config("fused", T, d_in, d_out, interp, es)
        grid = (_cdiv(T, cfg["BT"]), _cdiv(d_out, cfg["BN"]))
        tk.fused_lora_kernel[grid](
            y, x, a_cat, b_cat, gates, layout.rank_offsets, layout.scalings, T, d_in, d_out, K,
            y.stride(0), y.stride(1), x.stride(0), x.stride(1), a_cat.stride(0), a_cat.stride(1),
            b_cat.stride(0), b_cat.stride(1), gates.stride(0), gates.stride(1),
            BT=cfg["BT"], BN=cfg["BN"], BR=br, BK=cfg["BK"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"], **flags)
        return

    if meta is None:
        meta = LoRAMeta.from_layout(gates, layout)
    h = torch.zeros(T, R, device=x.device, dtype=torch.float32)           # (T, R) gated shrink
    cfg = block_config("shrink", T, d_in, d_out, interp, es)
    tk.shrink_kernel[(_cdiv(T, cfg["BT"]), K)](
        x, a_cat, h, meta.sorted_token_ids, meta.pair_weights, meta.num_tokens_per_expert,
        meta.expert_start, meta.active_expert_ids, layout.rank_offsets,
        d_in, x.stride(0), x.stride(1), a_cat.stride(0), a_cat.stride(1), h.stride(0),
        BT=cfg["BT"], BR=br, BK=cfg["BK"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **flags)
    _launch_expand(y, h, b_cat, gates, layout, br, interp, flags)


def _launch_expand(y, h, b_cat, gates, layout: RankLayout, br: int, interp: bool,
                   flags: dict) -> None:
    from . import _triton_kernels as tk
    T, d_out = y.shape
    cfg = block_config("expand", T, 0, d_out, interp, y.element_size())
    grid = (_cdiv(T, cfg["BT"]), _cdiv(d_out, cfg["BN"]))
    tk.expand_kernel[grid](
        y, h, b_cat, gates, layout.rank_offsets, T, d_out, layout.num_experts,
        y.stride(0), y.stride(1), h.stride(0), b_cat.stride(0), b_cat.stride(1),
        gates.stride(0), gates.stride(1),
        BT=cfg["BT"], BN=cfg["BN"], BR=br, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        **flags)


def fused_linear(x: torch.Tensor, w_aug: torch.Tensor, b_cat: torch.Tensor, gates: torch.Tensor,
                 rank_offsets, scalings: torch.Tensor, d_out: int, bias: torch.Tensor | None = None,
                 meta: LoRAMeta | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: y = x W^T (+ bias) + sum_k gates[:, k] * scalings[k] * (x A_k^T) B_k^T.

    x [T, d_in]; w_aug [d_out + R, d_in] = [W; A_cat]; b_cat [d_out, R]; bias [d_out] or None;
    all one dtype among fp16, bf16, fp32, one device.  gates [T, K] fp32, scalings [K] fp32,
    rank_offsets [K+1] int (read on the host unless ``meta`` is given, see grouped_lora).
    Launch 1 is one GEMM of width d_out + R (base columns to y, LoRA columns gated to an fp32
    h [T, R]); launch 2 is the expand, y += h B_cat^T.  out: optional y [T, d_out] to write
    (overwritten, not accumulated).  Returns y [T, d_out] in x's dtype.
    """
    for name, t, what in (("x", x, "[T, d_in]"), ("w_aug", w_aug, "[d_out + R, d_in]"),
                          ("b_cat", b_cat, "[d_out, R]")):
        _check_tensor(name, t, 2, what)
    extra = {"w_aug": w_aug, "b_cat": b_cat}
    if bias is not None:
        _check_tensor("bias", bias, 1, "[d_out]")
        extra["bias"] = bias
    if out is not None:
        _check_tensor("out", out, 2, "[T, d_out]")
        extra["out"] = out
    _check_same(x, extra)
    T, d_in = x.shape
    d_out = int(d_out)
    R = w_aug.shape[0] - d_out
    if w_aug.shape[1] != d_in:
        raise ValueError(f"w_aug has d_in={w_aug.shape[1]} columns but x has d_in={d_in}")
    if R < 0:
        raise ValueError(f"w_aug has {w_aug.shape[0]} rows, fewer than d_out={d_out}")
    if tuple(b_cat.shape) != (d_out, R):
        raise ValueError(f"b_cat has shape {tuple(b_cat.shape)} but (d_out, R) = ({d_out}, {R}) "
                         f"from d_out and w_aug [d_out + R, d_in]")
    if bias is not None and bias.shape[0] != d_out:
        raise ValueError(f"bias has {bias.shape[0]} entries but d_out={d_out}")
    if out is not None and tuple(out.shape) != (T, d_out):
        raise ValueError(f"out has shape {tuple(out.shape)} but (T, d_out) = ({T}, {d_out})")
    K = _num_experts(rank_offsets, meta)
    _check_gates(gates, T, K, x)
    interp = _require_mode(x)
    layout = _layout(gates, rank_offsets, scalings, meta, T, R, x)
    if meta is None:
        meta = LoRAMeta.from_layout(gates, layout)
    y = out if out is not None else torch.empty(T, d_out, device=x.device, dtype=x.dtype)
    if T == 0 or d_out == 0:
        return y
    with on_device(x):
        _launch_linear(y, x, w_aug, b_cat, bias, gates, layout, meta, interp, T, d_in, d_out, R)
    return y


def _launch_linear(y, x, w_aug, b_cat, bias, gates, layout, meta, interp: bool, T: int, d_in: int,
                   d_out: int,
                   R: int) -> None:
    """fused_linear's launches (its checks done, under its device guard)."""
    from . import _triton_kernels as tk
    flags = _dot_flags(x, interp)
    h = torch.empty(T, R, device=x.device, dtype=torch.float32)           # (T, R) gated shrink
    cfg = block_config("linear", T, d_in, d_out, interp, x.element_size())
    bm, bn = cfg["BM"], cfg["BN"]
    grid = (_cdiv(T, bm), _cdiv(d_out, bn) + _cdiv(R, bn))
    tk.linear_shrink_kernel[grid](
        y, h, x, w_aug, bias if bias is not None else x, gates, layout.scalings,
        meta.expert_of_rank,
        T, d_in, d_out, R,
        y.stride(0), y.stride(1), h.stride(0), x.stride(0), x.stride(1),
        w_aug.stride(0), w_aug.stride(1), gates.stride(0), gates.stride(1),
        HAS_BIAS=bias is not None, BM=bm, BN=bn, BK=cfg["BK"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"], **flags)
    if R > 0:
        _launch_expand(y, h, b_cat, gates, layout, rank_tile(layout.max_rank), interp, flags)


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _num_experts(rank_offsets, meta: LoRAMeta | None) -> int:
    if meta is not None:
        return meta.num_experts
    if isinstance(rank_offsets, RankLayout):
        return rank_offsets.num_experts
    try:
        return len(rank_offsets) - 1
    except TypeError:
        raise ValueError("rank_offsets must be a 1-D [K+1] tensor or sequence, "
                         f"got {rank_offsets!r}") from None
