"""The grouped product in plain torch, two GEMMs per layer whatever K is: the ``torch`` backend
(torch_backend.py), and the fallback of the triton/cuda and cpu backends for the rows their
kernels do not take.

    [y; h]^T = W_aug x^T             one GEMM over W_aug = [W; A_cat] (base and shrink together)
    y^T[part] += B_part (G_exp^T * h^T)[part]     one expand GEMM per projection

Experts whose gate is zero for the whole batch are skipped by gathering the active experts' rows
of A_cat and columns of B once per active set (``Gathered``, kept per Linear for the last
GATHERED_SETS sets); token routing reads all experts instead (its set changes every layer and
step, and re-gathering would copy more than reading all experts once, zero gates included).
Works on transposed activations (gemm.columns), the form that streams weights fastest on CPU.
"""
from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
from pf_kernels.layout import RankLayout

from pf_engine.backends import gemm

# Active sets whose gathered copies a Linear keeps (least recently used dropped): a continuous
# batch alternates between the decode batch's set and each admitted prompt's own set, and a
# single cached set made every Linear re-gather twice per step (bench_serving shows the cost).
GATHERED_SETS = 4


@dataclass
class Active:
    """The experts of one group restricted to an active set (gathered copies, built once)."""
    a: torch.Tensor                      # [R_act, d_in]
    layout: RankLayout                   # [R_act] rows
    parts: list                          # [(out0, out1, r0, r1, b_act [d_out_m, R_act_m])]


class Gathered:
    """A Linear's gathered active sets, least recently used first (the torch backend's state)."""

    def __init__(self):
        self.sets: collections.OrderedDict = collections.OrderedDict()      # act -> Active

    def get(self, lin, act: tuple) -> Active:
        """The active experts' rows of A_cat and columns of B, built once per active set."""
        A = self.sets.get(act)
        if A is not None:
            self.sets.move_to_end(act)
            return A
        parts, layouts, rows, r = [], [], [], 0
        for p in lin.parts:
            sub, cols = p.layout.select(act)
            if sub is not None:
                cols_t = torch.tensor(cols, device=p.b.device)
                parts.append((p.out0, p.out1, r, r + len(cols), p.b[:, cols_t].contiguous()))
                layouts.append(sub)
                rows += [lin.d_out + p.r0 + c for c in cols]
                r += len(cols)
        A = Active(lin.w_aug[torch.tensor(rows, device=lin.w_aug.device)].contiguous(),
                   RankLayout.concat(layouts), parts)
        self.sets[act] = A
        if len(self.sets) > GATHERED_SETS:
            self.sets.popitem(last=False)
        return A


def grouped(lin, x2: torch.Tensor, mix, gathered: Gathered) -> torch.Tensor:
    """The grouped product for rows x2 [N, d_in] -> y [N, d_out] (see the module doc)."""
    xT = gemm.columns(x2)                                               # (d_in, N)
    d_out = lin.d_out
    act = tuple(e for e in mix.active if e in lin.experts)
    if len(act) == len(lin.experts) or mix.token_router is not None:
        outT = gemm.mm(lin.w_aug, xT, lin.bias_aug)                     # (d_out + R, N)
        yT, hT = outT[:d_out], outT[d_out:]
        layout = lin.layout
        parts = [(p.out0, p.out1, p.r0, p.r1, p.b) for p in lin.parts]
    else:
        A = gathered.get(lin, act)
        yT = gemm.mm(lin.weight, xT, lin.bias)                          # (d_out, N)
        hT = gemm.mm(A.a, xT)                                           # (R_act, N)
        layout, parts = A.layout, A.parts
    hT = hT * mix.expanded(layout, hT.dtype)                            # (R, N) gated
    for o0, o1, r0, r1, b in parts:
        yT[o0:o1] += gemm.mm(b, hT[r0:r1])
    return yT.t()
