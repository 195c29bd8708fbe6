"""The cpu backend's attention for the steps model.decoder.Block runs (prefill chunks, and decode
steps the fused CpuRunner does not take): csrc/cpu's decode attention, one row per token.

torch's scaled_dot_product_attention and batched matmul sum each query's keys in an order that
depends on the chunk's length and on the batch (their blocking and vector widths): the same
prompt prefilled whole or in 7-token chunks gave different greedy tokens (4 of 9 comparisons at
64 tokens on the bundled 4-bit model).  Here every (token, head) is one job of
csrc/cpu/attention.cpp that sums its own columns in order, masked ones skipped:

    for the valid tokens (b, t) of the view:  slot s0 + b, column starts[b] + t
    k, v = rope(k), v written at that column     (all tokens of the call first)
    a[b, t] = softmax(q_t . K[:c+1] + bias) V    (bias: the view's mask, 0 or -inf)

so a token's output does not depend on which tokens share its call or chunk.  Padding tokens
are skipped (their output is zero and never used).  Calls of at most MAX_ROWS tokens, in order:
a token sees the columns written by the calls before and by its own.
"""
from __future__ import annotations

import torch
from pf_kernels import cpu_ops

from pf_engine.backends.cpu.kernel import MAX_ROWS


def applies(cache, qkv: torch.Tensor) -> bool:
    """A step on a slot cache (a RowsView) in fp32 on the CPU."""
    return getattr(cache, "pool", None) is not None and qkv.dtype == torch.float32 and \
        qkv.device.type == "cpu"


def attention(blk, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache,
              mask: torch.Tensor, threads: int) -> torch.Tensor:
    """a [B, T, H * D] for qkv [B, T, H + 2 H_kv, D] (before RoPE), cos/sin [B, T, H + H_kv, D]
    (Rotary.tables), ``cache`` a RowsView, mask bool [B, 1, T, L] or the additive decode bias
    [B, 1, 1, L]; writes the valid tokens' k, v into the pool."""
    B, T = qkv.shape[:2]
    H, D = blk.H, blk.D
    g = _glue(qkv, cos, sin, cache, mask)
    b, t = g.sel
    rows = qkv[b, t].reshape(len(b), -1).contiguous()                  # [n, (H + 2 H_kv) D]
    out = torch.empty(len(b), H * D, dtype=torch.float32)
    k, v = cache.pool.k.numpy(), cache.pool.v.numpy()
    for i, (cs, sn, cols, bias, slots) in enumerate(g.calls):
        j = slice(i * MAX_ROWS, (i + 1) * MAX_ROWS)
        cpu_ops.decode_attention(rows[j].numpy(), cs, sn, k, v, blk.index, 0, cols, bias,
                                 out[j].numpy(), threads, slots=slots)
    a = torch.zeros(B, T, H * D, dtype=torch.float32)
    a[b, t] = out
    return a


class _Glue:
    """What every layer's call of one forward shares (the same view, mask and RoPE tables):
    the valid tokens (b, t) and, per call of MAX_ROWS of them, their cos/sin rows, columns,
    mask bias and slots as arrays (built per layer, this glue was about 5% of a 44-token
    prefill of the bundled model)."""

    def __init__(self, qkv, cos, sin, cache, mask):
        B, T = qkv.shape[:2]
        self.key = (mask, cos, sin)
        if T == 1:
            b, t = torch.arange(B), torch.zeros(B, dtype=torch.long)
        else:
            b, t = cache.sel
        self.sel = (b, t)
        cs, sn = cos[b, t].contiguous(), sin[b, t].contiguous()             # [n, H + H_kv, D]
        m = mask[b, 0, t]                                                   # [n, L]
        bias = m if m.dtype != torch.bool else \
            torch.zeros(m.shape, dtype=torch.float32).masked_fill_(~m, float("-inf"))
        bias = bias.contiguous()
        slots = cache.rows.to(torch.int64).contiguous()
        cols = cache.cols.to(torch.int64).contiguous()
        self.calls = [tuple(a[i:i + MAX_ROWS].numpy() for a in (cs, sn, cols, bias, slots))
                      for i in range(0, len(b), MAX_ROWS)]


def _glue(qkv, cos, sin, cache, mask) -> _Glue:
    """The forward's _Glue: kept on a prefill chunk's view (RowsView, one per forward); built
    afresh for a decode step's (a static view's tensors change in place between steps)."""
    if qkv.shape[1] == 1:
        return _Glue(qkv, cos, sin, cache, mask)
    g = getattr(cache, "_cpu_attention_glue", None)
    if g is None or any(x is not y for x, y in zip(g.key, (mask, cos, sin))):
        g = _Glue(qkv, cos, sin, cache, mask)
        cache._cpu_attention_glue = g
    return g
