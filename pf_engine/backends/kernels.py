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


class Kernels(Backend):
    def __init__(self, device, name: str):
        super().__init__(device)
        self.name = name

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
