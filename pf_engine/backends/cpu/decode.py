"""The cpu backend's runner: a block's decode step in csrc/cpu calls, for up to MAX_ROWS rows.

model.decoder.Block computes a decode step with ~50 small torch ops per layer, each a few
microseconds of dispatch: on a 135M model that is as much time as reading the weights.  Here the
same maths runs as

    qkv = W_qkv rmsnorm(x) + b (+ experts)                prologue rmsnorm
    a   = attention(rope(q); rope(k), v -> cache)          decode_attention
    x   = x + W_o a + b (+ experts)                        residual epilogue
    gu  = W_gu rmsnorm(x) + b (+ experts)                  prologue rmsnorm
    x   = x + W_down (silu(gate) * up) + b (+ experts)     silu-mul prologue, residual

with the experts mixed by the same fused pass as the backend's products, and the attention
reading the scheduler's slot cache (runtime/kv_cache.RowsView).  It applies to fp32 decode
steps (one new token per row, at most MAX_ROWS rows) on a slot cache; every other forward (and
a model whose weights the kernel cannot read) takes model.decoder.Block, which tests hold this
path to.
"""
from __future__ import annotations

import torch
from pf_kernels import cpu_ops

from pf_engine.backends.base import Blocks
from pf_engine.backends.cpu.kernel import MAX_ROWS, PRO_RMSNORM, PRO_SILU_MUL
from pf_engine.runtime.threads import POLICY


def _fp32(t) -> bool:
    return t is None or (t.dtype == torch.float32 and t.is_contiguous())


class CpuRunner(Blocks):
    """Runs a forward's blocks: fused decode steps where they apply, model.decoder.Block else."""

    def __init__(self, model):
        super().__init__(model)
        self.fused = all(lin.state.plan is not None for blk in model.blocks for lin in blk.linears) \
            and all(_fp32(t) for blk in model.blocks for t in (blk.attn_norm, blk.mlp_norm))

    def applies(self, x: torch.Tensor, cache) -> bool:
        """x [B, 1, d]: a decode step of at most MAX_ROWS fp32 rows on a slot cache."""
        return self.fused and x.shape[1] == 1 and x.shape[0] <= MAX_ROWS and \
            x.dtype == torch.float32 and getattr(cache, "pool", None) is not None

    def __call__(self, x, cos, sin, cache, mask, mix):
        if not self.applies(x, cache):
            return super().__call__(x, cos, sin, cache, mask, mix)
        B, _, d = x.shape
        cos, sin, bias = cos.contiguous(), sin.contiguous(), mask.contiguous()
        cols = cache.cols.contiguous()
        h = x.reshape(B, d).clone()                      # the hidden state, updated in place
        threads = POLICY.threads()
        for blk in self.blocks:
            m = mix.for_layer(blk.index, h.view(B, 1, d)) if mix is not None else None
            g = None if m is None else m.gates
            qkv = _run(blk.qkv, h, g, threads, PRO_RMSNORM, blk.attn_norm, blk.eps)
            a = torch.empty(B, blk.H * blk.D, dtype=torch.float32)
            k, v = cache.pool.k[blk.index], cache.pool.v[blk.index]        # [slots, H_kv, max, D]
            cpu_ops._load()[0].decode_attention(
                qkv.data_ptr(), B, qkv.stride(0), blk.H, blk.H_kv, blk.D, cos.data_ptr(),
                sin.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), k.stride(1), cache.s0,
                cols.data_ptr(), cache.end, bias.data_ptr(), bias.shape[-1], a.data_ptr(), threads)
            _run(blk.o, a, g, threads, residual=h, out=h)
            gu = _run(blk.gate_up, h, g, threads, PRO_RMSNORM, blk.mlp_norm, blk.eps)
            _run(blk.down, gu, g, threads, PRO_SILU_MUL, residual=h, out=h)
        return h.view(B, 1, d)


def _run(lin, x, gates, threads, prologue=0, norm=None, eps=0.0, residual=None, out=None):
    """One projection group's fused call; gates only when the Linear has experts."""
    y = torch.empty(x.shape[0], lin.d_out, dtype=torch.float32) if out is None else out
    return lin.state.plan.run(x, y, gates if lin.parts else None, threads, prologue, norm, eps,
                              residual)
