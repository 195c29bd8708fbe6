"""csrc/cpu's fused linear as the cpu backend calls it: one ``Plan`` per Linear, built once.

    plan.run(x, y, gates=None, threads=1, prologue=PRO_NONE, norm=None, eps=0.0, residual=None)

y [T, d_out] = residual + prologue(x) W^T + b + sum over the active experts (see
csrc/cpu/grouped_lora_cpu.cpp); x [T, d_in] (2 d_in with PRO_SILU_MUL), T <= MAX_ROWS rows,
gates [T, K] fp32 or None (the base product).
"""
from __future__ import annotations

import torch
from pf_kernels import cpu_ops

MAX_ROWS = cpu_ops.MAX_TOKENS
PRO_NONE, PRO_RMSNORM, PRO_SILU_MUL = 0, 1, 2


def plan(lin) -> "Plan | None":
    """The kernel's plan for ``lin``; None when its weights are not fp32 on CPU."""
    w = lin.w_aug if lin.parts else lin.weight
    return Plan(lin, w) if w.dtype == torch.float32 and w.device.type == "cpu" else None


class Plan:
    def __init__(self, lin, w):
        self.w = w.contiguous()
        self.bias = None if lin.bias is None else lin.bias.contiguous()
        self.d_out, self.d_in = lin.d_out, lin.d_in
        self.R = self.w.shape[0] - lin.d_out
        parts, bptrs, blocks, scale, self.bT = [], [], [], [], []
        for p in lin.parts:
            b = p.b.t().contiguous()              # B^T [R_m, d_out_m]: see the kernel's pass 2
            self.bT.append(b)
            j0 = len(blocks)
            for e, r0, r1, s in p.layout.blocks:
                blocks.append((e, p.r0 + r0, p.r0 + r1))
                scale.append(s)
            parts.append((p.out0, p.out1, p.r0, p.r1, j0, len(blocks)))
            bptrs.append(b.data_ptr())
        self.parts = torch.tensor(parts, dtype=torch.int64).view(-1, 6)
        self.bptrs = torch.tensor(bptrs, dtype=torch.int64)
        self.blocks = torch.tensor(blocks, dtype=torch.int64).view(-1, 3)
        self.scale = torch.tensor(scale, dtype=torch.float32)
        self.dummy = torch.zeros(1, 1)

    def run(self, x, y, gates=None, threads=1, prologue=PRO_NONE, norm=None, eps=0.0, residual=None):
        mod = cpu_ops._load()[0]
        if gates is None:
            g, K, gs, P, J = self.dummy, 1, 0, 0, 0
        else:
            g = gates.contiguous()
            K, gs, P, J = g.shape[1], g.stride(0), self.parts.shape[0], self.blocks.shape[0]
        mod.fused_linear_pe(
            x.data_ptr(), x.shape[0], x.stride(0), self.d_in, self.w.data_ptr(), self.d_out, self.R,
            0 if self.bias is None else self.bias.data_ptr(), g.data_ptr(), K, gs, y.data_ptr(),
            y.stride(0), self.parts.data_ptr(), self.bptrs.data_ptr(), P, self.blocks.data_ptr(),
            self.scale.data_ptr(), J, threads, prologue, 0 if norm is None else norm.data_ptr(), eps,
            0 if residual is None else residual.data_ptr(), 0 if residual is None else residual.stride(0))
        return y
