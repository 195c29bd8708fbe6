"""What a backend is: the one object, chosen when an engine is built, that decides how every layer
of its model runs.

    prepare(lin)    -> the backend's prepared state for one Linear (``lin.state``), built when
                       the Linear is bound and rebuilt whenever its experts change (attach)
    linear(lin, x2, mix, decode) -> y [N, d_out] for rows x2 [N, d_in]; mix None: the base
                       product (no expert has a gate in these rows)
    runner(model)   -> the callable that runs all blocks of a forward (model.decoder's loop by
                       default; the cpu backend's fuses each block's decode step in C++)
    few_rows        -> steps with at most this many rows run their products in the backend's
                       own threads, torch at one thread (backends/threads.py)
    own_threads(n)  -> whether a forward of n rows does so: n <= few_rows, or (cpu) every
                       product is the backend's whatever the rows

A backend never reads environment variables or re-tests the machine per call: what it can run
was settled by ``backends.resolve_backend`` when the engine was built.
"""
from __future__ import annotations

import torch

from pf_engine.backends import gemm
from pf_engine.backends.threads import ThreadPolicy


class Blocks:
    """Runs the model's blocks one after another (model.decoder.Block): every backend's default."""

    def __init__(self, model):
        self.blocks = model.blocks

    def __call__(self, x, cos, sin, cache, mask, mix, step):
        for blk in self.blocks:
            x = blk(x, cos, sin, cache, mask, mix, step)
        return x


class Backend:
    name = "?"
    quantized = False   # runs block-quantized weights (model/qweight.QuantWeight): the cpu backend
    few_rows = 1        # a single decode row: numpy's BLAS GEMV (gemm.mm) at the caller's threads

    def __init__(self, device: torch.device):
        self.device = device
        self.policy = ThreadPolicy()        # this backend's (this engine's) CPU thread settings

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.device})"

    def prepare(self, lin):
        return None

    def own_threads(self, rows: int) -> bool:
        """A forward of ``rows`` token rows runs its products in the backend's threads, torch at
        one thread (backends/threads.py)."""
        return rows <= self.few_rows

    def runner(self, model):
        return Blocks(model)

    def batch_invariant(self) -> bool:
        """Whether every product and attention of the prepared model rounds each row the same
        whatever else is in its batch (the cpu backend's kernels); torch's GEMMs do not."""
        return False

    def attention(self, blk, qkv, cos, sin, cache, mask):
        """A block's attention output [B, T, H * D] from qkv [B, T, H + 2 H_kv, D] before RoPE
        (writing the step's k, v into ``cache``), or None: model.decoder.Block's own (torch)."""
        return None

    def linear(self, lin, x2: torch.Tensor, mix, decode: bool) -> torch.Tensor:
        if mix is None:
            return gemm.linear(x2, lin.weight, lin.bias, decode)
        return self.mixed(lin, x2, mix, decode)

    def mixed(self, lin, x2: torch.Tensor, mix, decode: bool) -> torch.Tensor:
        """y for rows whose gates give some attached expert a weight (``mix``)."""
        raise NotImplementedError
