"""Plain torch references for the grouped-LoRA kernels: what every backend is held to.

Notation (shared by every module of pf_kernels):
    T tokens, K experts with ranks r_k stacked into R = sum_k r_k rows.
    x        [T, d_in]        activations
    a_cat    [R, d_in]        A_1; ...; A_K stacked: expert k owns rows
                              rank_offsets[k]:rank_offsets[k+1]
    b_cat    [d_out, R]       B_1 ... B_K side by side: expert k owns the same columns
    gates    [T, K]  fp32     g[t, k], many zeros under top-k routing
    scalings [K]     fp32     s_k (alpha / r_k, or alpha / sqrt(r_k) for rsLoRA)
    rank_offsets [K+1] int    0 = o_0 <= o_1 <= ... <= o_K = R (or a RankLayout, scalings None)

    delta[t] = sum_k g[t, k] * s_k * B_k (A_k x[t])
             = ((x A_cat^T) * G_exp) B_cat^T          G_exp[t, j] = g[t, k(j)] * s_k(j)   [T, R]

These functions favour clarity over speed; they accumulate in ``acc_dtype`` (fp64 by default) and
return in it, so tests can compare any backend against them.
"""
from __future__ import annotations

import torch

from .layout import RankLayout

__all__ = ["expand_gates", "grouped_lora_ref", "grouped_lora_loop_ref", "fused_linear_ref"]


def _offsets_list(rank_offsets) -> list[int]:
    if isinstance(rank_offsets, RankLayout):
        return list(rank_offsets.offsets)
    if isinstance(rank_offsets, torch.Tensor):
        return [int(v) for v in rank_offsets.tolist()]
    return [int(v) for v in rank_offsets]


def _scalings(rank_offsets, scalings):
    """The scalings beside rank_offsets, or a RankLayout's own (scalings None)."""
    if scalings is None and isinstance(rank_offsets, RankLayout):
        return rank_offsets.scalings
    return scalings


def expand_gates(gates: torch.Tensor, rank_offsets, scalings: torch.Tensor,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """G_exp [T, R] in ``dtype``: each gate repeated over its expert's rank and multiplied by s_k.

    gates [T, K], rank_offsets [K+1], scalings [K]  ->
    G_exp[t, j] = gates[t, k(j)] * scalings[k(j)].
    """
    offs, scalings = _offsets_list(rank_offsets), _scalings(rank_offsets, scalings)
    ranks = torch.tensor([offs[k + 1] - offs[k] for k in range(len(offs) - 1)], device=gates.device)
    per_expert = gates.to(dtype) * scalings.to(gates.device, dtype)[None, :]    # (T, K)
    return torch.repeat_interleave(per_expert, ranks, dim=1)                     # (T, R)


def grouped_lora_ref(x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor, gates: torch.Tensor,
                     rank_offsets, scalings: torch.Tensor,
                     acc_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """delta [T, d_out] = ((x A_cat^T) * G_exp) B_cat^T, computed and returned in ``acc_dtype``.

    x [T, d_in], a_cat [R, d_in], b_cat [d_out, R], gates [T, K], rank_offsets [K+1], scalings [K].
    """
    g_exp = expand_gates(gates, rank_offsets, scalings, acc_dtype)             # (T, R)
    h = x.to(acc_dtype) @ a_cat.to(acc_dtype).t()                                # (T, R)
    return (h * g_exp) @ b_cat.to(acc_dtype).t()                                 # (T, d_out)


def grouped_lora_loop_ref(x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor,
                          gates: torch.Tensor, rank_offsets, scalings: torch.Tensor,
                          acc_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The same delta as :func:`grouped_lora_ref`, one expert at a time (the naive baseline's
    maths)."""
    offs, scalings = _offsets_list(rank_offsets), _scalings(rank_offsets, scalings)
    xd = x.to(acc_dtype)
    delta = torch.zeros(x.shape[0], b_cat.shape[0], dtype=acc_dtype, device=x.device)
    for k in range(len(offs) - 1):
        lo, hi = offs[k], offs[k + 1]
        a_k = a_cat[lo:hi].to(acc_dtype)                                         # (r_k, d_in)
        b_k = b_cat[:, lo:hi].to(acc_dtype)                                      # (d_out, r_k)
        g_k = gates[:, k].to(acc_dtype) * float(scalings[k])                     # (T,)
        delta += g_k[:, None] * ((xd @ a_k.t()) @ b_k.t())
    return delta


def fused_linear_ref(x: torch.Tensor, w_aug: torch.Tensor, b_cat: torch.Tensor, gates: torch.Tensor,
                     rank_offsets, scalings: torch.Tensor, d_out: int,
                     bias: torch.Tensor | None = None,
                     acc_dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """y [T, d_out] = x W^T (+ bias) + delta, with W_aug = [W; A_cat] [d_out + R, d_in].

    Computed and returned in ``acc_dtype``.
    """
    xd = x.to(acc_dtype)
    y = xd @ w_aug[:d_out].to(acc_dtype).t()                                     # (T, d_out)
    if bias is not None:
        y = y + bias.to(acc_dtype)[None, :]
    return y + grouped_lora_ref(x, w_aug[d_out:], b_cat, gates, rank_offsets, scalings, acc_dtype)
