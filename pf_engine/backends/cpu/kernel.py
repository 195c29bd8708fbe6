"""The cpu backend's prepared form of a Linear: csrc/cpu's typed ``LinearPlan``, built once.

    plan = kernel.plan(lin)          # None when the Linear's weights are not fp32 on CPU
    plan.run(x, y, gates, threads, prologue=PRO_NONE, norm=None, eps=0.0, residual=None)

computes y [T, d_out] = residual + prologue(x) W^T + b + sum over the active experts, for
T <= MAX_ROWS rows (csrc/cpu/linear_plan.h has the maths; pf_kernels.cpu_ops the full API).
The plan holds numpy views of the Linear's W_aug and bias and its own B^T copies (the kernel's
expand streams rows of B^T), all checked in C++ when it is built.
"""
from __future__ import annotations

import torch
from pf_kernels import cpu_ops

MAX_ROWS = cpu_ops.MAX_ROWS
PRO_NONE, PRO_RMSNORM, PRO_SILU_MUL = cpu_ops.PRO_NONE, cpu_ops.PRO_RMSNORM, cpu_ops.PRO_SILU_MUL


def plan(lin):
    """The LinearPlan of ``lin`` (model/linear.py), or None when its weights are not fp32 on CPU."""
    w = lin.w_aug if lin.parts else lin.weight
    if w.dtype != torch.float32 or w.device.type != "cpu":
        return None
    parts, blocks = [], []
    for i, p in enumerate(lin.parts):
        parts.append((p.out0, p.out1, p.r0, p.r1, p.b.t().contiguous().numpy()))
        blocks += [(i, e, p.r0 + r0, p.r0 + r1, s) for e, r0, r1, s in p.layout.blocks]
    return cpu_ops.LinearPlan(w.contiguous().numpy(), lin.d_out,
                              None if lin.bias is None else lin.bias.contiguous().numpy(),
                              parts, blocks, lin.num_experts)


def run(plan, x: torch.Tensor, gates: torch.Tensor | None, threads: int) -> torch.Tensor:
    """y [N, d_out] for rows x [N, d_in] (gates [N, K] or None: the base product)."""
    y = torch.empty(x.shape[0], plan.d_out, dtype=torch.float32)
    plan.run(x.numpy(), y.numpy(), None if gates is None else gates.numpy(), threads)
    return y
