"""A block's decode step on CPU in five C++ calls (csrc/cpu), for up to SMALL_N rows in fp32.

model.Block computes a decode step with ~50 small torch ops per layer, each a few microseconds
of dispatch: on a 135M model that is as much time as reading the weights.  Here the same maths
runs as

    qkv = W_qkv rmsnorm(x) + b (+ experts)                fused_linear_pe, prologue rmsnorm
    a   = attention(rope(q); rope(k), v -> cache)          decode_attention
    x   = x + W_o a + b (+ experts)                        fused_linear_pe, residual
    gu  = W_gu rmsnorm(x) + b (+ experts)                  fused_linear_pe, prologue rmsnorm
    x   = x + W_down (silu(gate) * up) + b (+ experts)     fused_linear_pe, silu-mul + residual

with the experts mixed by the same fused pass as the ``cpu`` backend (csrc/cpu/
grouped_lora_cpu.cpp) and the attention reading the scheduler's slot cache (kv_cache.RowsView).
``eligible`` says when it applies: CPU fp32 tensors, one new token per row, at most SMALL_N rows,
a RowsView cache, no experts or the ``cpu`` backend, and the kernel built (PF_NO_CPU_KERNEL=1
turns the kernel off, PF_NO_CPU_DECODE=1 this path alone: ``ENABLED``).  Anything else takes model.Block, which tests hold this path to.
"""
from __future__ import annotations

import os

import torch

from pf_engine.runtime.kv_cache import RowsView
from pf_engine.persona.mix import SMALL_N, Mix, cpu_kernel
from pf_engine.runtime.threads import user_threads

PRO_NONE, PRO_RMSNORM, PRO_SILU_MUL = 0, 1, 2
ENABLED = not os.environ.get("PF_NO_CPU_DECODE")


_MODULE = None


def _module():
    """pf_kernels._pf_cpu, looked up once (a decode step calls it ~150 times)."""
    global _MODULE
    if _MODULE is None:
        from pf_kernels import cpu_ops
        _MODULE = cpu_ops._load()[0]
    return _MODULE


def eligible(model, x: torch.Tensor, cache, mix: Mix | None) -> bool:
    """x [B, 1, d]: whether this forward's blocks can take ``block_step``."""
    if not ENABLED or x.device.type != "cpu" or x.dtype != torch.float32 or x.shape[1] != 1 or x.shape[0] > SMALL_N:
        return False
    if not isinstance(cache, RowsView) or not cache.pool.k.is_contiguous() or not cpu_kernel():
        return False
    if mix is not None and mix.backend != "cpu":
        return False
    ok = getattr(model, "_cpu_decode_ok", None)
    if ok is None:
        ok = model._cpu_decode_ok = all(
            t is None or (t.dtype == torch.float32 and t.is_contiguous())
            for blk in model.blocks for t in (blk.attn_norm, blk.mlp_norm, *_weights(blk)))
    return ok


def _weights(blk):
    for lin in blk.linears:
        yield lin.w_aug if lin.parts else lin.weight
        yield lin.bias


def _static(lin) -> tuple:
    """A Linear's arguments for fused_linear_pe, built once: (base: (args, tail, dummy gate row's
    address), with experts: (args, tail) or None)."""
    got = getattr(lin, "_cpu_pe", None)
    if got is None:
        from pf_kernels.cpu_ops import empty_meta

        from pf_engine.backends import Cpu
        w = lin.w_aug if lin.parts else lin.weight
        bias = 0 if lin.bias is None else lin.bias.data_ptr()
        empty = empty_meta()
        base = ((w.data_ptr(), lin.d_out, 0, bias),
                (empty["parts"].data_ptr(), empty["bptrs"].data_ptr(), 0, empty["blocks"].data_ptr(),
                 empty["scale"].data_ptr(), 0), empty["gates"].data_ptr())
        mixed = None
        if lin.parts:
            m = Cpu.meta(lin)
            mixed = (m["args"], m["tail"])
        got = lin._cpu_pe = (base, mixed)
    return got


def linear(lin, x2: torch.Tensor, mix: Mix | None, pro: int = PRO_NONE, pro_w=None, eps: float = 0.0,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """y [B, d_out] = residual + W_aug-linear of prologue(x2) for rows x2 [B, d_in'] (contiguous;
    d_in' = 2 d_in for the silu-mul prologue)."""
    base, mixed = _static(lin)
    B = x2.shape[0]
    d_in = lin.weight.shape[1]
    g = None
    if mix is not None and mixed is not None:       # inactive experts: zero gates, skipped in C++
        (args, tail), g = mixed, mix.gates.contiguous()
        gp, K, gs = g.data_ptr(), g.shape[1], g.stride(0)
    else:
        (args, tail, gp), K, gs = base, 1, 0
    y = torch.empty(B, lin.d_out, dtype=torch.float32)
    _module().fused_linear_pe(
        x2.data_ptr(), B, x2.stride(0), d_in, *args, gp, K, gs, y.data_ptr(), lin.d_out, *tail,
        user_threads(), pro, 0 if pro_w is None else pro_w.data_ptr(), eps,
        0 if residual is None else residual.data_ptr(), 0 if residual is None else residual.stride(0))
    return y


def block_step(blk, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, view: RowsView,
               bias: torch.Tensor, mix: Mix | None) -> torch.Tensor:
    """model.Block's decode step: x [B, 1, d] -> [B, 1, d]; cos/sin [B, 1, H + H_kv, D] and the
    additive bias [B, 1, 1, L] contiguous (``prepare``)."""
    B, _, d = x.shape
    if mix is not None:
        mix = mix.for_layer(blk.index, x)
    x2 = x.view(B, d)
    qkv = linear(blk.qkv, x2, mix, PRO_RMSNORM, blk.attn_norm, blk.eps)
    H, H_kv, D = blk.H, blk.H_kv, blk.D
    k, v = view.pool.k[blk.index], view.pool.v[blk.index]                  # [slots, H_kv, max, D]
    a = torch.empty(B, H * D, dtype=torch.float32)
    _module().decode_attention(qkv.data_ptr(), B, qkv.stride(0), H, H_kv, D, cos.data_ptr(),
                               sin.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1),
                               view.s0, view.cols_host.data_ptr(), view.end, bias.data_ptr(),
                               bias.shape[-1], a.data_ptr(), user_threads())
    x2 = linear(blk.o, a, mix, residual=x2)
    gu = linear(blk.gate_up, x2, mix, PRO_RMSNORM, blk.mlp_norm, blk.eps)
    x2 = linear(blk.down, gu, mix, PRO_SILU_MUL, residual=x2)
    return x2.view(B, 1, d)


def prepare(view: RowsView, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor):
    """What every layer's block_step reads, made contiguous once per forward."""
    view.cols_host = view.cols.contiguous()
    return cos.contiguous(), sin.contiguous(), bias.contiguous()
