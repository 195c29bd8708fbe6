"""The plain products of the torch-based backends: y = x W^T (+ b) in the form that is fastest
for the rows at hand.

On CPU a decode step (one new token per sequence) multiplies a weight by few rows.  Then
y^T = W x^T (``columns``: the activations transposed) is a GEMM with a small second dimension,
which MKL streams faster than the y = x W^T form, and a single fp32 row is a GEMV done by numpy's
BLAS (OpenBLAS in the PyPI wheels), which reads weights faster than MKL's GEMV; a single row of
another dtype goes through a two-column GEMM.  While a step runs those, torch stays at one
thread (backends/threads.py) so that its OpenMP workers do not spin against the BLAS threads.
Passes over several tokens per sequence (prefill, scoring) use F.linear, the form transformers
uses, so that their logits round as transformers' do (the parity tests hold them to 1e-4).
benchmarks/bench_mixing.py times the base product in both forms.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def columns(x2: torch.Tensor) -> torch.Tensor:
    """x2 [N, d_in] -> xT [d_in, N] (a view)."""
    return x2.t()


def mm(w: torch.Tensor, xT: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """W xT (+ bias as a column): [d_out, d_in] @ [d_in, N] -> [d_out, N]."""
    if xT.shape[1] == 1 and w.device.type == "cpu":
        if w.dtype == torch.float32:
            y = torch.from_numpy(w.numpy() @ xT[:, 0].numpy()).unsqueeze(1)
            return y if bias is None else y.add_(bias.unsqueeze(1))
        xT = torch.cat([xT, xT], 1)            # MKL: a two-column GEMM beats its GEMV
        return (torch.mm(w, xT) if bias is None else torch.addmm(bias.unsqueeze(1), w, xT))[:, :1]
    return torch.mm(w, xT) if bias is None else torch.addmm(bias.unsqueeze(1), w, xT)


def linear(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           decode: bool = False) -> torch.Tensor:
    """y = x2 W^T + b for x2 [N, d_in] -> [N, d_out]; ``decode`` rows on CPU take ``mm``'s forms."""
    if x2.device.type != "cpu" or not decode:
        return F.linear(x2, w, bias)
    return mm(w, columns(x2), bias).t()
