"""The one place every linear layer of the model goes through, and where persona experts mix.

A ``Linear`` holds one or several projections that read the same input, fused along the output
dimension (q|k|v, gate|up), and computes for N token rows x [N, d_in]

    y = x W^T + b + sum_k g[t,k] s_k B_k A_k x          W [d_out, d_in], A_k [r_k, d_in], B_k [d_out, r_k]

where the sum runs over the experts of the adapter bank that target each projection.  Stacking
the experts (A_cat [R, d_in], B_cat [d_out, R], G_exp[t, j] = g[t, k(j)] * s_k(j)) turns the sum
into two GEMMs whatever K is:

    h = x A_cat^T                 shrink  [N, R]
    y += (h * G_exp) B_cat^T      expand  [N, d_out]

Backends (``Mix.backend``, implemented in backends.py): ``torch`` (grouped: the base GEMM and the
shrink as one GEMM over W_aug = [W; A_cat], then one expand GEMM per projection; inactive experts
skipped), ``naive`` (the baseline: a loop over projections and experts), ``triton`` / ``cuda``
(the fused kernels of pf_kernels).
"""
from __future__ import annotations

import collections
import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pf_kernels.layout import RankLayout

from pf_engine.errors import PFError

BACKENDS = ("torch", "naive", "triton", "cuda", "cpu")


def backend_status(name: str, device: torch.device) -> tuple[bool, str]:
    """(usable, why not) for a backend on ``device``."""
    if name in ("torch", "naive"):
        return True, ""
    if name == "triton":
        try:
            import pf_kernels
        except ImportError as e:
            return False, f"pf_kernels cannot be imported ({e})"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "no GPU (on CPU tensors triton runs only with TRITON_INTERPRET=1)"
        return pf_kernels.available()
    if name == "cpu":
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, not {device.type}"
        try:
            from pf_kernels import cpu_ops
        except ImportError as e:
            return False, f"pf_kernels cannot be imported ({e})"
        return cpu_ops.cpu_available()
    if name == "cuda":
        if device.type != "cuda":
            return False, "no GPU: the cuda backend needs device='cuda'"
        try:
            from pf_kernels import cuda_ops
        except ImportError as e:
            return False, f"pf_kernels cannot be imported ({e})"
        return cuda_ops.cuda_available()
    return False, f"unknown backend; expected one of auto, {', '.join(BACKENDS)}"


def resolve_backend(name: str | None, device: torch.device) -> str:
    """auto (or None) -> the fastest backend as measured; a named one must be usable.

    On CPU that is ``cpu`` (csrc/cpu's fused kernel) when it is built and the CPU has AVX2/FMA
    (benchmarks/results/bench_generate.json: faster than torch in every persona row), else
    ``torch``.  On a GPU it is torch for now: on an H200 (bf16, gpu_mixing.json and
    gpu_generate.json) the grouped torch backend was the fastest in 242 of 252 op-level rows, and
    decoded 1.6x faster than the cuda kernel and 3.6x faster than triton end to end.  The kernels
    stay available by name.
    """
    if name in (None, "auto"):
        return "cpu" if device.type == "cpu" and backend_status("cpu", device)[0] else "torch"
    ok, why = backend_status(name, device)
    if not ok:
        raise PFError(f"backend={name!r} is not available: {why}")
    return name


def columns(x2: torch.Tensor) -> torch.Tensor:
    """x2 [N, d_in] -> xT [d_in, N]: the torch and naive backends compute y^T = W x^T.

    With W row-major [d_out, d_in], y^T = W x^T is a GEMM with a small second dimension, which
    MKL streams 1.5-2x faster than the y = x W^T form for N = 2..16 (a batched decode step); a
    single row is a GEMV, done by numpy's BLAS on CPU (see ``mm``).  benchmarks/bench_mixing.py
    times the base linear both ways.
    """
    return x2.t()


SMALL_N = 16     # fp32 CPU products with at most this many columns go to csrc/cpu when built


@functools.lru_cache(maxsize=None)
def cpu_kernel() -> bool:
    """csrc/cpu is built and this CPU runs it (PF_NO_CPU_KERNEL=1 turns it off)."""
    if os.environ.get("PF_NO_CPU_KERNEL"):
        return False
    try:
        from pf_kernels import cpu_ops
    except ImportError:
        return False
    return cpu_ops.cpu_available()[0]


def mm(w: torch.Tensor, xT: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W xT (+ bias as a column): [d_out, d_in] @ [d_in, N] -> [d_out, N].

    On CPU a single fp32 column goes to numpy's BLAS (OpenBLAS in the PyPI wheels), whose GEMV
    reads weights about 1.5x faster than MKL's here; two or more columns use torch's GEMM.  The
    engine runs single-row decode with torch at one thread so that torch's OpenMP workers do not
    spin against the BLAS threads (engine.CpuThreads).
    """
    if w.device.type == "cpu" and w.dtype == torch.float32 and xT.shape[1] <= SMALL_N and \
            w.is_contiguous() and (bias is None or bias.is_contiguous()) and cpu_kernel():
        from pf_kernels.cpu_ops import gemm_small
        from pf_engine.runtime.threads import user_threads
        return gemm_small(w, xT.t().contiguous(), bias, user_threads()).t()
    if xT.shape[1] == 1 and w.device.type == "cpu":
        if w.dtype == torch.float32:
            y = torch.from_numpy(w.numpy() @ xT[:, 0].numpy()).unsqueeze(1)
            return y if bias is None else y.add_(bias.unsqueeze(1))
        xT = torch.cat([xT, xT], 1)            # MKL: a two-column GEMM beats its GEMV
        return (torch.mm(w, xT) if bias is None else torch.addmm(bias.unsqueeze(1), w, xT))[:, :1]
    return torch.mm(w, xT) if bias is None else torch.addmm(bias.unsqueeze(1), w, xT)


def linear(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           decode: bool = False) -> torch.Tensor:
    """y = x2 W^T + b for x2 [N, d_in] -> [N, d_out].

    ``decode``: the N rows are one new token per sequence.  On CPU those take ``mm``'s forms
    (W x^T, numpy's GEMV for one row), which stream the weights fastest for few rows; passes
    over several tokens per sequence (prefill, scoring) use x W^T, the form transformers uses,
    so that their logits round as transformers' do (the parity tests hold them to 1e-4).
    """
    if x2.device.type != "cpu" or not decode:
        return F.linear(x2, w, bias)
    return mm(w, columns(x2), bias).t()


@dataclass
class Part:
    """One projection of a group that experts target: its columns in y and its block of h."""
    out0: int
    out1: int
    r0: int
    r1: int
    b: torch.Tensor                      # [d_out_m, R_m]
    a: torch.Tensor                      # [R_m, d_in] (a view into W_aug)
    layout: RankLayout                   # its experts' blocks within rows r0:r1 (pf_kernels)


# Active sets whose gathered copies a Linear keeps (backends.Torch; least recently used dropped): a continuous
# batch alternates between the decode batch's set and each admitted prompt's own set, and a
# single cached set made every Linear re-gather twice per step (10% of a serving run's time).
GATHERED_SETS = 4


@dataclass
class Active:
    """The experts of one group restricted to an active set (gathered copies, built once)."""
    a: torch.Tensor                      # [R_act, d_in]
    layout: RankLayout                   # [R_act] rows
    parts: list                          # [(out0, out1, r0, r1, b_act [d_out_m, R_act_m])]


class Mix:
    """Per-forward mixing state: the gates of every token row and the backend.

    gates: [N, K] fp32 for the N = B * T rows of this forward, the same for every layer (explicit
    personas, the sequence router; zero rows run the base model).  With a ``token_router``, the
    rows flagged in ``token_rows`` [N] bool get fresh gates in every layer from the hidden state
    entering it; ``token_sum`` [N, K] adds them up over layers (for reporting).  ``active``: the
    sorted expert ids whose gate is nonzero somewhere in the batch (the others are skipped).
    """

    def __init__(self, gates: torch.Tensor, backend: str = "torch", token_router=None,
                 token_rows: torch.Tensor | None = None, active: tuple | None = None,
                 any_token: bool | None = None, static: bool = False):
        """active / any_token: what the caller knows on the host (the scheduler does): the active
        expert ids and whether any row is token-routed.  Left None, they are read from the
        tensors, which costs a host sync on a GPU.  static: never read the device (a step captured
        in a CUDA graph): the naive loop then runs every expert under token routing too."""
        from pf_engine.backends import implementation
        self.backend, self.impl, self.fixed = backend, implementation(backend), gates
        self.static = static
        if any_token is None:
            any_token = token_rows is not None and bool(token_rows.any())
        self.token_router = token_router if any_token else None
        self.token_rows = token_rows
        self.token_sum = None
        if self.token_router is not None:     # every layer sets its own gates (for_layer)
            active = tuple(range(gates.shape[1]))
        self._set(gates, active)

    def _set(self, gates: torch.Tensor, active: tuple | None = None) -> None:
        self.gates = gates
        self.active = active if active is not None else tuple(
            torch.nonzero(gates.abs().sum(0)).flatten().tolist())
        self._expanded = {}
        self.cache = {}                  # the backend's metadata for these gates (backends.py)

    def expanded(self, layout: RankLayout, dtype: torch.dtype) -> torch.Tensor:
        """G_exp^T [R, N] = (gates[:, col_expert] * col_scaling)^T, computed once per layout."""
        g = self._expanded.get((layout, dtype))
        if g is None:
            g = (self.gates[:, layout.col_expert] * layout.col_scaling).t().to(dtype)
            self._expanded[(layout, dtype)] = g
        return g

    def for_layer(self, layer: int, x: torch.Tensor) -> "Mix":
        """The gates to use in ``layer`` given its input x [B, T, d] (token routing recomputes)."""
        if self.token_router is not None:
            g = self.token_router(layer, x.reshape(-1, x.shape[-1])).float()
            g = torch.where(self.token_rows.unsqueeze(1), g, self.fixed)
            self.token_sum = g if self.token_sum is None else self.token_sum + g
            # Only the naive loop skips experts per layer; the grouped and kernel paths read all
            # experts under token routing, so they need no host sync for the active set.
            per_layer = self.backend == "naive" and not self.static
            self._set(g, None if per_layer else tuple(range(g.shape[1])))
        return self


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 splits: tuple[int, ...] | None = None, modules: tuple[str, ...] = ()):
        self.weight = weight                     # [d_out, d_in]
        self.bias = bias                         # [d_out] or None
        self.splits = splits                     # output sizes of the fused projections
        self.modules = modules                   # their names (q, k, v, ...), for adapters
        self.w_aug = None                        # [d_out + R, d_in] once experts are attached
        self.parts: list[Part] = []
        self._active: collections.OrderedDict = collections.OrderedDict()   # act -> Active, LRU

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    def attach(self, loras: dict) -> None:
        """Attach the experts of each projection: ``loras[module]`` is a LoraWeights or None.

        The base weight becomes a view of W_aug = [W; A_cat] (no second copy of W is kept).
        """
        d_out = self.d_out
        sizes = self.splits or (d_out,)
        offs = [0]
        for s in sizes:
            offs.append(offs[-1] + s)
        parts, a_list, r = [], [], 0
        for i, m in enumerate(self.modules):
            lw = loras.get(m)
            if lw is None:
                continue
            layout = lw.layout.to(self.weight.device)
            parts.append(Part(offs[i], offs[i + 1], r, r + lw.rank, lw.b.to(self.weight.dtype),
                              None, layout))
            a_list.append(lw.a.to(self.weight.dtype))
            r += lw.rank
        if not parts:
            return
        self.w_aug = torch.cat([self.weight] + a_list, 0)
        self.weight = self.w_aug[:d_out]
        for p in parts:
            p.a = self.w_aug[d_out + p.r0:d_out + p.r1]
        self.parts = parts
        self.layout = RankLayout.concat([p.layout for p in parts])
        self.bias_aug = None if self.bias is None else torch.cat(
            [self.bias, self.bias.new_zeros(r)])
        self.experts = tuple(sorted({e for p in parts for e in p.layout.experts}))
        self._active.clear()

    def __call__(self, x: torch.Tensor, mix: Mix | None = None):
        """x [..., d_in] -> y [..., d_out], or its per-projection slices for a fused group."""
        y = self.full(x, mix)
        return y.split(self.splits, dim=-1) if self.splits else y

    def full(self, x: torch.Tensor, mix: Mix | None = None) -> torch.Tensor:
        """x [..., d_in] -> y [..., d_out] (all projections of the group side by side)."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                       # (N, d_in)
        if mix is None or not self.parts or not set(mix.active).intersection(self.experts):
            y = linear(x2, self.weight, self.bias, decode=len(shape) > 2 and shape[-2] == 1)
        else:
            y = mix.impl.linear(self, x2, mix)                              # backends.py
        return y.view(*shape[:-1], self.d_out)
