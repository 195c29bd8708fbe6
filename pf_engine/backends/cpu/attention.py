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
    if T == 1:
        b = torch.arange(B)
        t = torch.zeros(B, dtype=torch.long)
    else:
        b, t = cache.sel
    rows = qkv[b, t].reshape(len(b), -1).contiguous()                  # [n, (H + 2 H_kv) D]
    cs, sn = cos[b, t].contiguous(), sin[b, t].contiguous()             # [n, H + H_kv, D]
    m = mask[b, 0, t]                                                   # [n, L]
    bias = m if m.dtype != torch.bool else \
        torch.zeros(m.shape, dtype=torch.float32).masked_fill_(~m, float("-inf"))
    bias = bias.contiguous()
    slots = cache.rows.to(torch.int64).contiguous()
    cols = cache.cols.to(torch.int64).contiguous()
    out = torch.empty(len(b), H * D, dtype=torch.float32)
    k, v = cache.pool.k.numpy(), cache.pool.v.numpy()
    for i in range(0, len(b), MAX_ROWS):
        j = slice(i, i + MAX_ROWS)
        cpu_ops.decode_attention(rows[j].numpy(), cs[j].numpy(), sn[j].numpy(), k, v, blk.index,
                                 0, cols[j].numpy(), bias[j].numpy(), out[j].numpy(), threads,
                                 slots=slots[j].numpy())
    a = torch.zeros(B, T, H * D, dtype=torch.float32)
    a[b, t] = out
    return a
