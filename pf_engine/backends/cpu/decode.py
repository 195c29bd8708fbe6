"""The cpu backend's runner: a decoder block's decode step in one csrc/cpu call per MAX_ROWS
rows.

model.decoder.Block computes a decode step with ~50 small torch ops per layer, each a few
microseconds of dispatch: on a 135M model that is as much time as reading the weights.  Here a
block is one ``BlockPlan.step`` (csrc/cpu/block_plan.h), the hidden state h [B, d] updated in
place:

    qkv = W_qkv rmsnorm(h) + b (+ experts)                prologue rmsnorm
    a   = attention(rope(q); rope(k), v -> cache)          RoPE, KV write, GQA attention
    h  += W_o a + b (+ experts)                            residual epilogue
    gu  = W_gu rmsnorm(h) + b (+ experts)                  prologue rmsnorm
    h  += W_down (silu(gate) * up) + b (+ experts)         silu-mul prologue, residual

with the experts mixed by the same fused pass as the backend's products (the Linears'
LinearPlans) and the attention reading the scheduler's slot cache (model/kv_cache.RowsView).
It applies to fp32 decode steps (one new token per row) on a slot cache, of at most MAX_ROWS rows
or, on a batch-invariant model, of any rows, MAX_ROWS per call (so a row's sums are the same in
any batch); every other forward (and a model whose weights the kernel cannot read) takes
model.decoder.Block, which tests hold this path to.

A tensor-parallel shard (parallel/tp.py: its blocks' ``reduce`` set) steps here when ``reduce``
carries a ShmGroup (``reduce.group``): o's and down's outputs are summed over the ranks inside
the call (block_plan.h).  Any other reduce (gloo) takes model.decoder.Block.
"""
from __future__ import annotations

import torch
from pf_kernels import cpu_ops

from pf_engine.backends.base import Blocks
from pf_engine.backends.cpu.kernel import MAX_ROWS


def block_plan(blk):
    """The BlockPlan of ``blk`` (its four Linears' plans and norms), None when one is missing."""
    plans = [lin.state.plan for lin in blk.linears]
    norms = (blk.attn_norm, blk.mlp_norm)
    if any(p is None for p in plans) or any(n.dtype != torch.float32 for n in norms):
        return None
    return cpu_ops.BlockPlan(*plans, *(n.contiguous().numpy() for n in norms), blk.eps,
                             blk.H, blk.H_kv, blk.D)


class CpuRunner(Blocks):
    """Runs a forward's blocks: fused decode steps where they apply, model.decoder.Block else."""

    def __init__(self, model):
        super().__init__(model)
        self.backend = model.backend
        self.policy = model.backend.policy
        plans = [block_plan(blk) for blk in model.blocks]
        reduce = model.blocks[0].reduce if model.blocks else None
        self.group = getattr(reduce, "group", None)
        usable = all(p is not None for p in plans) and (reduce is None or self.group is not None)
        self.plans = plans if usable else None

    def applies(self, x: torch.Tensor, cache, step) -> bool:
        """x [B, 1, d]: a decode step (model/step.py) of fp32 rows on a slot cache, at most
        MAX_ROWS of them, or any number where the model is batch-invariant (its products the
        kernel's at any rows): then each layer steps MAX_ROWS rows per call, so a row rounds as
        it does alone.  Larger steps of other models take torch's GEMMs (model.decoder.Block)."""
        return self.plans is not None and step.decode and x.dtype == torch.float32 and \
            getattr(cache, "pool", None) is not None and \
            (x.shape[0] <= MAX_ROWS or self.backend.batch_invariant())

    def __call__(self, x, cos, sin, cache, mask, mix, step):
        if not self.applies(x, cache, step):
            return super().__call__(x, cos, sin, cache, mask, mix, step)
        B, _, d = x.shape
        h = x.reshape(B, d).clone()                      # the hidden state, updated in place
        hn = h.numpy()
        # what every layer reads, as arrays once per forward: [B, H + H_kv, D] rope tables,
        # the pool [layers, slots, H_kv, max_len, D], the columns written, the additive mask
        cos, sin = cos.reshape(B, -1, cos.shape[-1]).contiguous().numpy(), \
            sin.reshape(B, -1, sin.shape[-1]).contiguous().numpy()
        k, v = cache.pool.k.numpy(), cache.pool.v.numpy()
        cols, bias = cache.cols.contiguous().numpy(), mask.reshape(B, -1).contiguous().numpy()
        threads = self.policy.threads()
        slots = cache.rows.to(torch.int64).numpy() if getattr(cache, "spread_rows", False) else None
        # MAX_ROWS rows per call, sliced once per forward: rows r at slots s0 + r (or ``slots``)
        calls = [(r, hn[r], cos[r], sin[r], cache.s0 + r.start if slots is None else cache.s0,
                  cols[r], bias[r], None if slots is None else slots[r])
                 for r in (slice(j, j + MAX_ROWS) for j in range(0, B, MAX_ROWS))]
        gates = None
        for blk, plan in zip(self.blocks, self.plans):
            if mix is not None:
                gates = mix.enter_layer(blk.index, h.view(B, 1, d)).gates.numpy()
            for r, hr, cr, sr, row0, colr, br, slr in calls:
                plan.step(hr, None if gates is None else gates[r], cr, sr, k, v, blk.index, row0,
                          colr, br, threads, self.group, slr)
        return h.view(B, 1, d)
