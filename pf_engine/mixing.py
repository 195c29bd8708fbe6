"""The one place every linear layer of the model goes through.

A ``Linear`` holds the weight of one or several projections that read the same input, fused
along the output dimension (q|k|v, gate|up), and computes

    y = x W^T + b                     x: [..., d_in]   W: [d_out, d_in]   y: [..., d_out]

returning the per-projection slices when fused.  Persona adapters plug in here (see the adapters
issue): the model never multiplies a weight itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class Linear:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 splits: tuple[int, ...] | None = None):
        self.weight = weight                     # [d_out, d_in]
        self.bias = bias                         # [d_out] or None
        self.splits = splits                     # output sizes of the fused projections

    @property
    def d_out(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor):
        y = F.linear(x, self.weight, self.bias)
        return y.split(self.splits, dim=-1) if self.splits else y
