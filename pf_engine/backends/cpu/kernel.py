"""The cpu backend's prepared form of a Linear: csrc/cpu's typed ``LinearPlan``, built once.

    plan = kernel.plan(lin)          # None when the Linear's weights are not fp32 on CPU
    plan.run(x, y, gates, threads, prologue=PRO_NONE, norm=None, eps=0.0, residual=None)

computes y [T, d_out] = residual + prologue(x) W^T + b + sum over the active experts, for
T <= MAX_ROWS rows (csrc/cpu/linear_plan.h has the maths; pf_kernels.cpu_ops the full API).
The plan holds numpy views of the Linear's W_aug (or its quantized W and A_cat) and bias and its
own B^T copies (the kernel's expand streams rows of B^T), all checked in C++ when it is built.
"""
from __future__ import annotations

import torch
from pf_kernels import cpu_ops

MAX_ROWS = cpu_ops.MAX_ROWS
PRO_NONE, PRO_RMSNORM, PRO_SILU_MUL = cpu_ops.PRO_NONE, cpu_ops.PRO_RMSNORM, cpu_ops.PRO_SILU_MUL


def plan(lin):
    """The LinearPlan of ``lin`` (model/linear.py), or None when its weights are neither fp32
    nor block-quantized on CPU.  A quantized W is read as it is, its experts' A_cat beside it."""
    parts, blocks = [], []
    for i, p in enumerate(lin.parts):
        parts.append((p.out0, p.out1, p.r0, p.r1, p.b.t().contiguous().numpy()))
        blocks += [(i, e, p.r0 + r0, p.r0 + r1, s) for e, r0, r1, s in p.layout.blocks]
    bias = None if lin.bias is None else lin.bias.contiguous().numpy()
    if lin.quantized:
        a = None if lin.a_cat is None else lin.a_cat.contiguous().numpy()
        return cpu_ops.LinearPlan(lin.weight.data.numpy(), lin.d_out, bias, parts, blocks,
                                  lin.num_experts, lin.weight.fmt.code, a, lin.d_in)
    w = lin.w_aug if lin.parts else lin.weight
    if w.dtype != torch.float32 or w.device.type != "cpu":
        return None
    return cpu_ops.LinearPlan(w.contiguous().numpy(), lin.d_out, bias, parts, blocks, lin.num_experts)


def run(plan, x: torch.Tensor, gates: torch.Tensor | None, threads: int) -> torch.Tensor:
    """y [N, d_out] for rows x [N, d_in] (gates [N, K] or None: the base product), MAX_ROWS
    rows per kernel call."""
    y = torch.empty(x.shape[0], plan.d_out, dtype=torch.float32)
    xn, yn, gn = x.numpy(), y.numpy(), None if gates is None else gates.numpy()
    for t0 in range(0, x.shape[0], MAX_ROWS):
        plan.run(xn[t0:t0 + MAX_ROWS], yn[t0:t0 + MAX_ROWS],
                 None if gn is None else gn[t0:t0 + MAX_ROWS], threads)
    return y
