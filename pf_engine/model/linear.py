"""The one linear layer every projection of the model goes through, with its persona experts.

A ``Linear`` holds one or several projections that read the same input, fused along the output
dimension (q|k|v, gate|up), and computes for N token rows x [N, d_in]

    y = x W^T + b + sum_k g[t,k] s_k B_k A_k x          W [d_out, d_in], A_k [r_k, d_in],
                                                        B_k [d_out, r_k]

where the sum runs over the experts of the adapter bank that target each projection.  Stacking
the experts (A_cat [R, d_in], B_cat [d_out, R], G_exp[t, j] = g[t, k(j)] * s_k(j)) turns the sum
into two GEMMs whatever K is:

    h = x A_cat^T                 shrink  [N, R]
    y += (h * G_exp) B_cat^T      expand  [N, d_out]

``attach`` stores the experts in the form every backend reads: W_aug = [W; A_cat] (the base
weight becomes a view of it, no second copy; ``a_cat`` is the rows below W), and one ``Part``
per adapted projection (its output columns, its rows of A_cat, its B and RankLayout).  A
block-quantized base (model/qweight.QuantWeight) stays as it is, with fp32 experts beside it:
then there is no W_aug and ``a_cat`` is a tensor of its own.  How the product is computed is the
backend's business (pf_engine/backends): ``bind`` hands the Linear to its backend, which builds
``state``, its own prepared form of this layer; ``attach`` rebuilds it, so it always matches
the experts attached.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from pf_kernels.layout import RankLayout

from pf_engine.model.qweight import QuantWeight


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


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 splits: tuple[int, ...] | None = None, modules: tuple[str, ...] = (),
                 backend=None):
        self.weight = weight                     # [d_out, d_in]: a tensor or a QuantWeight
        self.bias = bias                         # [d_out] or None
        self.splits = splits                     # output sizes of the fused projections
        self.modules = modules                   # their names (q, k, v, ...), for adapters
        self.w_aug = None                        # [d_out + R, d_in] once experts are attached
        self.a_cat = None                        # [R, d_in]: its rows below W (a float base)
        self.bias_aug = None                     # [d_out + R] (zeros under A_cat) with a bias
        self.parts: list[Part] = []
        self.layout: RankLayout | None = None    # all parts' blocks, rows 0:R of A_cat
        self.experts: frozenset = frozenset()    # bank ids of the experts attached
        self.num_experts = 0                     # K of the bank attached (gates are [N, K])
        self.backend, self.state = None, None
        if backend is not None:
            self.bind(backend)

    @property
    def quantized(self) -> bool:
        return isinstance(self.weight, QuantWeight)

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    @property
    def d_in(self) -> int:
        return self.weight.shape[1]

    def bind(self, backend) -> None:
        """Run on ``backend`` (pf_engine.backends): it prepares this layer's state."""
        self.backend = backend
        self.state = backend.prepare(self)

    def attach(self, loras: dict, num_experts: int) -> None:
        """Attach the experts of each projection of a bank of ``num_experts`` experts:
        ``loras[module]`` is a LoraWeights or None.

        The base weight becomes a view of W_aug = [W; A_cat]; the backend's state is rebuilt.
        """
        sizes = self.splits or (self.d_out,)
        offs = [0]
        for s in sizes:
            offs.append(offs[-1] + s)
        quant = self.quantized
        base = self.weight if quant or self.w_aug is None else self.w_aug[:self.d_out]
        parts, a_list, r = [], [], 0
        for i, m in enumerate(self.modules):
            lw = loras.get(m)
            if lw is None:
                continue
            parts.append(Part(offs[i], offs[i + 1], r, r + lw.rank, lw.b.to(base.dtype), None,
                              lw.layout.to(base.device)))
            a_list.append(lw.a.to(base.dtype))
            r += lw.rank
        if parts:
            d_out = base.shape[0]
            if quant:
                self.a_cat = torch.cat(a_list, 0)
            else:
                self.w_aug = torch.cat([base] + a_list, 0)
                self.weight, self.a_cat = self.w_aug[:d_out], self.w_aug[d_out:]
            for p in parts:
                p.a = self.a_cat[p.r0:p.r1]
            self.bias_aug = (None if self.bias is None
                             else torch.cat([self.bias, self.bias.new_zeros(r)]))
            self.layout = RankLayout.concat([p.layout for p in parts])
        else:
            self.weight = base if quant else base.contiguous()
            self.w_aug, self.a_cat, self.bias_aug, self.layout = None, None, None, None
        self.parts, self.num_experts = parts, num_experts
        self.experts = frozenset(e for p in parts for e in p.layout.experts)
        if self.backend is not None:
            self.bind(self.backend)

    def mixes(self, mix) -> bool:
        """Whether ``mix`` (persona.mix.Mix or None) gives any attached expert a gate."""
        return mix is not None and bool(self.experts) and not self.experts.isdisjoint(mix.active)

    def __call__(self, x: torch.Tensor, mix=None, decode: bool = False):
        """x [..., d_in] -> y [..., d_out], or its per-projection slices for a fused group."""
        y = self.full(x, mix, decode)
        return y.split(self.splits, dim=-1) if self.splits else y

    def full(self, x: torch.Tensor, mix=None, decode: bool = False) -> torch.Tensor:
        """x [..., d_in] -> y [..., d_out] (all projections of the group side by side).

        ``decode``: the rows are a decode step's, one new token per sequence (model/step.py;
        x [B, 1, d_in]): the backend may
        pick a GEMM form for few rows; passes over several tokens per sequence use x W^T, the
        form transformers uses, so that prefill logits round as transformers' do."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                       # (N, d_in)
        y = self.backend.linear(self, x2, mix if self.mixes(mix) else None, decode)
        return y.view(*shape[:-1], self.d_out)
