"""Routing metadata for the grouped-LoRA kernels, built once per step from the gates.

A token t uses expert k when gates[t, k] != 0; such a (token, expert) pair is *active*.  The
expert-major kernels (the prefill shrink) walk the active pairs grouped by expert, so that each
program reads one expert's A rows once for a block of its tokens and inactive pairs cost nothing.

Worked example: T = 4 tokens, K = 3 experts with ranks (8, 16, 8), top-2 routing.

    gates = [[0.6, 0.4, 0  ],        token 0 -> experts 0, 1
             [0,   0,   0  ],        token 1 -> none (all-zero row: the base model)
             [0.5, 0,   0.5],        token 2 -> experts 0, 2
             [0.7, 0.3, 0  ]]        token 3 -> experts 0, 1
    scalings = [2, 1, 2], rank_offsets = [0, 8, 24, 32]

    num_tokens_per_expert = [3, 2, 1]                     active pairs P = 6
    expert_start          = [0, 3, 5, 6]                  exclusive cumsum, [K+1]
    sorted_token_ids      = [0, 2, 3 | 0, 3 | 2 | -1 ...] expert 0's tokens, then 1's, then 2's;
                                                          capacity T*K = 12, padding -1
    pair_weights          = [1.2, 1.0, 1.4 | 0.4, 0.3 | 1.0 | 0 ...]   g[t, k] * s_k per pair
    active_expert_ids     = [0, 1, 2]                     experts with >= 1 token, then -1 padding
    num_active_experts    = [3]
    expert_of_rank        = [0]*8 + [1]*16 + [2]*8        k(j) for each of the R = 32 rank rows

Every per-step tensor has a fixed capacity (T*K pairs, K experts), so ``refill_`` recomputes them
in place without a device-to-host sync: the metadata can live inside a captured CUDA graph.
Only the bank layout (rank offsets, max rank, R) is read on the host, in ``build``: pass the
offsets as a CPU tensor or a list.  The gates are shared by every adapted layer of a step, so one
LoRAMeta per step serves them all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .layout import RankLayout, check_scalings, host_rank_offsets  # noqa: F401 - re-exported

__all__ = ["LoRAMeta", "bank_layout", "check_scalings", "host_rank_offsets"]




def bank_layout(rank_offsets, scalings: torch.Tensor | None,
                device: torch.device | str) -> RankLayout:
    """Validate rank_offsets [K+1] / scalings [K] and place them on ``device`` (int32 / fp32);
    a RankLayout (scalings None) is moved to ``device``.

    The offsets are read on the host: pass a CPU tensor or a list (a device tensor costs a sync).
    """
    if isinstance(rank_offsets, RankLayout):
        if scalings is not None and scalings is not rank_offsets.scalings:
            raise ValueError("scalings must be None when rank_offsets is a RankLayout "
                             "(it holds them)")
        return rank_offsets.to(device)
    return RankLayout(rank_offsets, scalings, device)


@dataclass
class LoRAMeta:
    """Active (token, expert) pairs grouped by expert, plus the bank layout.  See the module doc.

    Build it with :meth:`build`; refill it in place for the next step's gates with :meth:`refill_`
    (same T and K).  A launcher given ``meta`` trusts it to describe the gates it is given.
    """
    num_tokens: int                      # T
    num_experts: int                     # K
    total_rank: int                      # R
    max_rank: int                        # max_k r_k
    rank_offsets: torch.Tensor           # [K+1] int32
    scalings: torch.Tensor               # [K] fp32
    expert_of_rank: torch.Tensor         # [R] int32: k(j)
    sorted_token_ids: torch.Tensor       # [T*K] int32: active tokens grouped by expert, -1 padding
    pair_weights: torch.Tensor           # [T*K] fp32: g[t, k] * s_k of each pair, 0 padding
    num_tokens_per_expert: torch.Tensor  # [K] int32
    expert_start: torch.Tensor           # [K+1] int32: exclusive cumsum of the counts
    active_expert_ids: torch.Tensor      # [K] int32: experts with >= 1 token, ascending, -1 padding
    num_active_experts: torch.Tensor     # [1] int32
    bank: RankLayout | None = None       # the layout it was built from

    @property
    def device(self) -> torch.device:
        return self.rank_offsets.device

    @property
    def layout(self) -> RankLayout:
        if self.bank is None:
            self.bank = RankLayout(self.rank_offsets.cpu(), self.scalings)
        return self.bank

    @classmethod
    def build(cls, gates: torch.Tensor, rank_offsets: torch.Tensor | Sequence[int] | RankLayout,
              scalings: torch.Tensor | None) -> "LoRAMeta":
        """gates [T, K] fp32, rank_offsets [K+1] int, scalings [K] fp32 -> LoRAMeta on gates.device
        (or a RankLayout as rank_offsets, scalings None).

        rank_offsets is read on the host (pass a CPU tensor or a list to avoid a sync).
        """
        if not isinstance(gates, torch.Tensor) or gates.dim() != 2:
            raise ValueError("gates must be a 2-D tensor [T, K], "
                             f"got shape {tuple(getattr(gates, 'shape', ()))}")
        return cls.from_layout(gates, bank_layout(rank_offsets, scalings, gates.device))

    @classmethod
    def from_layout(cls, gates: torch.Tensor, layout: RankLayout) -> "LoRAMeta":
        """As :meth:`build`, from a validated :func:`bank_layout` on gates.device."""
        if gates.dim() != 2:
            raise ValueError(f"gates must be 2-D [T, K], got shape {tuple(gates.shape)}")
        if gates.dtype != torch.float32:
            raise ValueError(f"gates must be float32, got {gates.dtype}")
        t, k = gates.shape
        if k != layout.num_experts:
            raise ValueError(f"gates has K={k} columns "
                             f"but rank_offsets describes {layout.num_experts} experts")
        dev = gates.device
        ranks = layout.rank_offsets[1:] - layout.rank_offsets[:-1]                  # (K,)
        expert_of_rank = torch.repeat_interleave(
            torch.arange(k, device=dev, dtype=torch.int32), ranks.long(),
            output_size=layout.total_rank)
        i32 = dict(device=dev, dtype=torch.int32)
        meta = cls(num_tokens=t, num_experts=k, total_rank=layout.total_rank,
                   max_rank=layout.max_rank, rank_offsets=layout.rank_offsets,
                   scalings=layout.scalings, expert_of_rank=expert_of_rank,
                   sorted_token_ids=torch.empty(t * k, **i32),
                   pair_weights=torch.empty(t * k, device=dev, dtype=torch.float32),
                   num_tokens_per_expert=torch.empty(k, **i32),
                   expert_start=torch.empty(k + 1, **i32),
                   active_expert_ids=torch.empty(k, **i32),
                   num_active_experts=torch.empty(1, **i32), bank=layout)
        return meta.refill_(gates)

    def refill_(self, gates: torch.Tensor) -> "LoRAMeta":
        """Recompute the per-step tensors from ``gates`` [T, K] in place; no host sync."""
        t, k = self.num_tokens, self.num_experts
        if tuple(gates.shape) != (t, k):
            raise ValueError(f"gates has shape {tuple(gates.shape)} "
                             f"but this LoRAMeta was built for ({t}, {k})")
        if gates.device != self.device:
            raise ValueError(f"gates is on {gates.device} but this LoRAMeta lives on {self.device}")
        dev = gates.device
        active = (gates != 0).t()                                                   # (K, T)
        counts = active.sum(dim=1, dtype=torch.int32)                               # (K,)
        start = torch.zeros(k + 1, device=dev, dtype=torch.int32)
        start[1:] = torch.cumsum(counts, 0)
        # Pair (k, t) goes to slot start[k] + (its rank among expert k's tokens);
        # inactive pairs to a
        # dump slot at index T*K that is sliced off.
        rank_in_expert = torch.cumsum(active.to(torch.int32), dim=1) - 1            # (K, T)
        slot = torch.where(active, start[:-1, None] + rank_in_expert, t * k).long()
        tok = torch.arange(t, device=dev, dtype=torch.int32).expand(k, t)
        sorted_tok = torch.full((t * k + 1,), -1, device=dev, dtype=torch.int32)
        sorted_tok.scatter_(0, slot.flatten(), tok.flatten())
        weights = torch.zeros(t * k + 1, device=dev, dtype=torch.float32)
        weights.scatter_(0, slot.flatten(), (gates.t() * self.scalings[:, None]).flatten())
        has_tokens = counts > 0                                                     # (K,)
        aslot = torch.where(has_tokens, torch.cumsum(has_tokens.to(torch.int32), 0) - 1, k).long()
        act_ids = torch.full((k + 1,), -1, device=dev, dtype=torch.int32)
        act_ids.scatter_(0, aslot, torch.arange(k, device=dev, dtype=torch.int32))

        self.sorted_token_ids.copy_(sorted_tok[:t * k])
        self.pair_weights.copy_(weights[:t * k])
        self.num_tokens_per_expert.copy_(counts)
        self.expert_start.copy_(start)
        self.active_expert_ids.copy_(act_ids[:k])
        self.num_active_experts.copy_(has_tokens.sum(dtype=torch.int32).reshape(1))
        return self
