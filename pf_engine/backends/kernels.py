"""The ``triton`` and ``cuda`` backends: the fused kernels of pf_kernels, one launch per projection
(a lone projection on triton: base GEMM and shrink in one pass over W_aug = [W; A_cat]).

Each part's RankLayout (rank offsets and scalings on the device) is built at attach; each forward
gathers the part's gate columns and builds the Triton LoRAMeta once per expert subset (kept in
``Mix.cache``, shared by every layer and projection with the same experts), so no layer call
reads anything on the host.
"""
from __future__ import annotations

import torch.nn.functional as F

from pf_engine.backends.base import Backend
from pf_engine.backends.grouped import Gathered, grouped

# The cuda kernel keeps h [min(T, 16), R] fp32 in 44 KiB of shared memory (csrc/cuda/
# grouped_lora.h: kSharedBudget, kMaxTokens): parts of more rank rows than this run the torch
# backend's grouped GEMMs, decided when the Linear is prepared, not mid-forward.
CUDA_MAX_TOKENS, CUDA_SHARED_BUDGET = 16, 44 * 1024


def cuda_max_rank() -> int:
    """The most rank rows of one part the cuda kernel takes (704), from the built module's
    constants when it loads."""
    tokens, budget = CUDA_MAX_TOKENS, CUDA_SHARED_BUDGET
    try:
        from pf_kernels import cuda_ops
        mod, _ = cuda_ops._load()
        if mod is not None:
            tokens, budget = mod.MAX_TOKENS_PER_LAUNCH, getattr(mod, "SHARED_BUDGET", budget)
    except (ImportError, AttributeError):
        pass
    return budget // (4 * tokens)


class Kernels(Backend):
    def __init__(self, device, name: str):
        super().__init__(device)
        self.name = name

    def prepare(self, lin) -> Gathered | None:
        """cuda: a Gathered (the torch path's state) for a Linear with a part of more rank rows
        than the kernel's shared memory holds; None: every part runs the kernel."""
        if self.name == "cuda" and any(p.r1 - p.r0 > cuda_max_rank() for p in lin.parts):
            return Gathered()
        return None

    def inputs(self, p, mix, triton: bool):
        """(gates of the part's experts [N, n], LoRAMeta or None) for this forward."""
        got = mix.cache.get(p.layout)
        if got is None:
            g = mix.gates[:, p.layout.expert_ids].contiguous()
            meta = None
            if triton:
                from pf_kernels import LoRAMeta
                meta = LoRAMeta.from_layout(g, p.layout)
            got = mix.cache[p.layout] = (g, meta)
        return got

    def linear(self, lin, x2, mix, decode):
        if mix is None:
            return F.linear(x2, lin.weight, lin.bias)
        if isinstance(lin.state, Gathered):           # too many rank rows for the cuda kernel
            return grouped(lin, x2, mix, lin.state)
        import pf_kernels
        triton = self.name == "triton"
        if triton and len(lin.parts) == 1 and lin.splits is None:
            p = lin.parts[0]
            g, meta = self.inputs(p, mix, True)
            return pf_kernels.fused_linear(x2, lin.w_aug, p.b, g, p.layout, None, lin.d_out,
                                           bias=lin.bias, meta=meta)
        y = F.linear(x2, lin.weight, lin.bias)
        for p in lin.parts:
            g, meta = self.inputs(p, mix, triton)
            if triton:
                pf_kernels.grouped_lora(y[:, p.out0:p.out1], x2, p.a, p.b, g, p.layout, None,
                                        meta=meta)
            else:
                pf_kernels.cuda_ops.grouped_lora_cuda(y[:, p.out0:p.out1], x2, p.a, p.b, g,
                                                      p.layout, None)
        return y
