"""The ``cpu`` backend: csrc/cpu's fused AVX2/FMA kernels for the few rows of a decode step.

* Weights in fp32, 16-bit (f16, bf16) or block-quantized (q8_0, q4_0, q4_1: model/qweight.py);
  the persona experts in fp32, bf16 or q8_0, chosen once per engine (experts.py).
  Every product of a W stored as bytes, decode or prefill, is the kernel's (MAX_ROWS rows per
  call: its dot products keep pace with torch's fp32 GEMM, and W is never dequantized); a bf16
  W's prefill takes AMX-BF16 tiles where the CPU has them, unless ``deterministic``
  (csrc/cpu/amx_bf16.h: then not batch-invariant).
* Every product of at most ``MAX_ROWS`` fp32 rows (a decode step's projections and LM head, the
  mixed projections of a short prompt chunk) is one kernel call per projection group: one pass
  streams W and the active experts' rows of A_cat, each chunk of W's rows adding the expand
  (csrc/cpu/linear_plan.cpp).  Larger batches take the torch backend's grouped GEMMs, unless
  ``deterministic``: then every fp32 product is the kernel's too (MAX_ROWS rows per call), whose
  rows do not depend on the batch (about half the fp32 prefill throughput: README).
* A decode step on the scheduler's slot cache runs each block as csrc/cpu calls with the RMS
  norm and silu-mul prologues and the residual epilogues fused in (``decode.CpuRunner``).
* Every other step on the slot cache (prefill chunks, larger decode batches) takes csrc/cpu's
  attention too (attention.py): each token's sum over its columns in a fixed order, so greedy
  tokens do not depend on the prefill chunking or the batch.

The per-Linear state (``CpuLinear``) is built once when the Linear is bound or its experts
change: the kernel's view of its weights and blocks, and the torch backend's gathered sets.
"""
from __future__ import annotations

from dataclasses import dataclass

from pf_engine.backends import gemm
from pf_engine.backends.base import Backend
from pf_engine.backends.cpu import attention as cpu_attention
from pf_engine.backends.cpu import kernel
from pf_engine.backends.grouped import Gathered, grouped


@dataclass
class CpuLinear:
    """What the cpu backend keeps per Linear (``lin.state``)."""
    plan: object | None           # pf_kernels.cpu_ops.LinearPlan (kernel.plan); None: not fp32
    gathered: Gathered | None     # the torch backend's state, for batches of more rows


class Cpu(Backend):
    name = "cpu"
    few_rows = kernel.MAX_ROWS
    quantized = True

    def __init__(self, device, expert_format: str | None = None, deterministic: bool = False):
        super().__init__(device)
        kernel.check_constants()
        self.expert_format = expert_format      # experts.py: None (auto), f32, bf16 or q8
        self.deterministic = deterministic      # fp32 products the kernel's at any rows too
        self.torch_linears = 0                  # Linears whose larger batches are torch's GEMMs
        self.unplanned = 0                      # Linears the kernel cannot run (not fp32 floats)
        self.bf16_linears = 0                   # Linears with a bf16 W (amx_bf16.h's tiles)

    def prepare(self, lin) -> CpuLinear:
        self.torch_linears += not lin.quantized
        self.bf16_linears += lin.quantized and lin.weight.fmt.name == "bf16"
        plan = kernel.plan(lin, self.expert_format, bf16_tiles=not self.deterministic)
        self.unplanned += plan is None
        return CpuLinear(plan, Gathered() if lin.parts and not lin.quantized else None)

    def own_threads(self, rows: int) -> bool:
        """Also every prefill of a model whose Linears are all stored as bytes: its products are
        the kernel's at any size (so also every prefill when ``deterministic``), and torch's
        threads beside the kernel's pool (attention, norms) only fought it for the cores
        (measured: 1.2-1.6x slower prefill on 2 cores)."""
        return rows <= self.few_rows or self.torch_linears == 0 or self.deterministic

    def runner(self, model):
        from pf_engine.backends.cpu.decode import CpuRunner
        return CpuRunner(model)

    def batch_invariant(self) -> bool:
        """Every Linear stored as bytes (the kernel runs them at any rows; but a bf16 W where
        its prefill takes AMX-BF16 tiles, whose sums are not the decode dots'), or
        ``deterministic`` (no tiles) and every fp32 Linear the kernel's; attention is csrc/cpu's
        on every slot-cache step."""
        tiles = self.bf16_linears > 0 and not self.deterministic and kernel.bf16_tiles()
        return (self.torch_linears == 0 and not tiles) or \
            (self.deterministic and self.unplanned == 0)

    def attention(self, blk, qkv, cos, sin, cache, mask):
        """csrc/cpu's attention, one job per (token, head) summing its own columns in order, for
        every fp32 step on a slot cache (attention.py): a token's output does not depend on its
        chunk or batch.  None elsewhere (whole sequences, other dtypes): torch's."""
        if not cpu_attention.applies(cache, qkv):
            return None
        return cpu_attention.attention(blk, qkv, cos, sin, cache, mask, self.policy.threads())

    def linear(self, lin, x2, mix, decode):
        N, plan = x2.shape[0], lin.state.plan
        if lin.quantized or (self.deterministic and plan is not None):   # any rows: the kernel,
                                                                          # MAX_ROWS per call
            return kernel.run(plan, x2 if x2.stride(-1) == 1 else x2.contiguous(),
                              None if mix is None else mix.gates, self.policy.threads())
        if plan is None or N > kernel.MAX_ROWS or (mix is None and not decode):
            if mix is None:
                return gemm.linear(x2, lin.weight, lin.bias, decode)
            return grouped(lin, x2, mix, lin.state.gathered)
        return kernel.run(plan, x2 if x2.stride(-1) == 1 else x2.contiguous(),
                          None if mix is None else mix.gates, self.policy.threads())
