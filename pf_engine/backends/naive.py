"""The ``naive`` backend: the baseline every benchmark shows beside the others, a loop over
projections and active experts with two small GEMMs, a scaling and an add each:

    y += g[t, k] * s_k * B_k (A_k x)        for every projection and every expert k with a gate

It skips the experts whose gate is zero in every row of the forward (``Mix.live``: under token
routing that reads the device once per layer, outside a captured step).
"""
from __future__ import annotations

from pf_engine.backends import gemm
from pf_engine.backends.base import Backend


class Naive(Backend):
    name = "naive"

    def mixed(self, lin, x2, mix, decode):
        xT = gemm.columns(x2)
        yT = gemm.mm(lin.weight, xT, lin.bias)
        live = set(mix.live())
        for p in lin.parts:
            for e, r0, r1, s in p.layout.blocks:
                if e in live:
                    delta = gemm.mm(p.b[:, r0:r1], gemm.mm(p.a[r0:r1], xT))       # (d_m, N)
                    yT[p.out0:p.out1] += (mix.gates[:, e] * s).to(delta.dtype) * delta
        return yT.t()
