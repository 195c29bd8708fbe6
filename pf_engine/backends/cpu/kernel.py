"""The cpu backend's prepared form of a Linear: csrc/cpu's typed ``LinearPlan``, built once.

    plan = kernel.plan(lin, expert_format)   # None when the Linear's weights are not fp32 on CPU
    plan.run(x, y, gates, threads, prologue=PRO_NONE, norm=None, eps=0.0, residual=None)

computes y [T, d_out] = residual + prologue(x) W^T + b + sum over the active experts, for
T <= MAX_LINEAR_ROWS rows (csrc/cpu/linear_plan.h has the maths; pf_kernels.cpu_ops the full API).
The plan holds numpy views of the Linear's W_aug (or its W stored as bytes) and bias, and its
own copies of the experts (A_cat, B^T: the kernel's expand streams rows of B^T) in their format
(experts.py), all checked in C++ when it is built.
"""
from __future__ import annotations

import torch
from pf_kernels import cpu_ops

from pf_engine.backends.cpu import experts

# csrc/cpu's constants, written here so that this module (and the engine, which imports it)
# loads where the extension is not built or the CPU cannot run it (the torch backend runs there);
# ``check_constants`` holds them to the extension's once the cpu backend is chosen.
MAX_ROWS = 16                    # the fused decode step's rows (decode.py)
MAX_LINEAR_ROWS = 4096           # rows per LinearPlan.run call
PRO_NONE, PRO_RMSNORM, PRO_SILU_MUL = 0, 1, 2


def check_constants() -> None:
    """The constants above equal the loaded extension's (a build out of step with this file
    fails here, in one line, rather than in a kernel)."""
    for name in ("MAX_ROWS", "MAX_LINEAR_ROWS", "PRO_NONE", "PRO_RMSNORM", "PRO_SILU_MUL"):
        if getattr(cpu_ops, name) != globals()[name]:
            raise RuntimeError(f"pf_kernels' CPU extension has {name}={getattr(cpu_ops, name)}, "
                               f"this engine {globals()[name]}: rebuild it (python "
                               "csrc/cpu/build.py)")


def bf16_tiles() -> bool:
    """Whether a bf16 W's prefill takes AMX-BF16 tiles on this CPU and instruction set."""
    return bool(cpu_ops.bf16_tiles())


def plan(lin, expert_format: str | None = None, bf16_tiles: bool = True):
    """The LinearPlan of ``lin`` (model/linear.py), or None when its weights are neither fp32
    nor stored as bytes on CPU.  A quantized or 16-bit W is read as it is; the experts are
    converted to ``expert_format`` (experts.py; None: auto's rule) once, here.  ``bf16_tiles``:
    a bf16 W's prefill may take AMX-BF16 tiles (csrc/cpu/amx_bf16.h; not batch-invariant)."""
    if not lin.quantized and (lin.weight.dtype != torch.float32 or lin.weight.device.type != "cpu"):
        return None
    efmt = experts.choose(expert_format, lin) if lin.parts else "f32"
    blocks = [(i, e, p.r0 + r0, p.r0 + r1, s) for i, p in enumerate(lin.parts)
              for e, r0, r1, s in p.layout.blocks]
    bias = None if lin.bias is None else lin.bias.contiguous().numpy()
    a, bts = experts.convert(lin, efmt, blocks) if lin.parts else (None, [])
    parts = [(p.out0, p.out1, p.r0, p.r1, bt.numpy()) for p, bt in zip(lin.parts, bts)]
    kw = dict(bias=bias, parts=parts, blocks=blocks, num_experts=lin.num_experts,
              expert_fmt=experts.CODES[efmt])
    if lin.quantized:
        p = cpu_ops.LinearPlan(lin.weight.data.numpy(), lin.d_out, fmt=lin.weight.fmt.code,
                               a_cat=None if a is None else a.numpy(), d_in=lin.d_in, **kw)
        p.bf16_tiles = bf16_tiles
        return p
    if efmt == "f32":                     # W_aug = [W; A_cat]: the shrink's rows follow W's
        w = lin.w_aug if lin.parts else lin.weight
        return cpu_ops.LinearPlan(w.contiguous().numpy(), lin.d_out, **kw)
    return cpu_ops.LinearPlan(lin.weight.contiguous().numpy(), lin.d_out, a_cat=a.numpy(), **kw)


def run(plan, x: torch.Tensor, gates: torch.Tensor | None, threads: int) -> torch.Tensor:
    """y [N, d_out] for rows x [N, d_in] (gates [N, K] or None: the base product),
    MAX_LINEAR_ROWS rows per kernel call."""
    y = torch.empty(x.shape[0], plan.d_out, dtype=torch.float32)
    xn, yn, gn = x.numpy(), y.numpy(), None if gates is None else gates.numpy()
    for t0 in range(0, x.shape[0], MAX_LINEAR_ROWS):
        j = slice(t0, t0 + MAX_LINEAR_ROWS)
        plan.run(xn[j], yn[j], None if gn is None else gn[j], threads)
    return y
