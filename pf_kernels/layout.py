"""RankLayout: how LoRA experts' ranks stack into one A_cat / B_cat (the engine's one layout type).

n blocks, block i being bank expert e_i of rank r_i, stack into R = sum_i r_i rank rows:

    A_cat [R, d_in]   block i owns rows    offsets[i]:offsets[i+1]
    B_cat [d_out, R]  block i owns columns offsets[i]:offsets[i+1]
    delta[t] = sum_i g[t, e_i] * s_i * B_i (A_i x[t])

Worked example: experts 0 and 2 of a bank adapt a projection with ranks 2 and 3, scalings 2 and 1:

    experts = (0, 2)    offsets = (0, 2, 5)    host_scalings = (2.0, 1.0)
    col_expert  = [0, 0, 2, 2, 2]       the bank expert of each rank row
    col_scaling = [2, 2, 1, 1, 1]       its scaling
    G_exp[t, j] = g[t, col_expert[j]] * col_scaling[j]    [T, R], one multiply per rank row

The same object serves every layer of the engine: the adapter bank describes each module's
experts with it (persona/bank.LoraWeights), the mixing backends expand gates and gather active
sets with it (persona/mix.py, pf_engine/backends), the kernels read its device tensors
(``rank_offsets``, ``scalings``, ``num_experts``, ``total_rank``, ``max_rank``) and the
references accept it in place of ``rank_offsets``.  Host values (``experts``, ``offsets``) are
plain tuples, so nothing that reads a layout during a step syncs with the device.

Kernel callers that only know (rank_offsets, scalings) get ``experts = 0..n-1``.  The engine's
layouts come from :meth:`RankLayout.interned`, one object per distinct value and device, so
per-forward caches keyed by the layout (expanded gates, kernel metadata) are shared by every layer
and projection with the same experts.
"""
from __future__ import annotations

import weakref
from typing import Sequence

import torch

__all__ = ["RankLayout", "check_scalings", "host_rank_offsets"]


def host_rank_offsets(rank_offsets) -> list[int]:
    """rank_offsets [K+1] (a RankLayout, tensor or sequence) as a validated list of ints (a CUDA
    tensor costs a sync)."""
    if isinstance(rank_offsets, RankLayout):
        return list(rank_offsets.offsets)
    if isinstance(rank_offsets, torch.Tensor):
        if rank_offsets.dim() != 1:
            raise ValueError("rank_offsets must be 1-D [K+1], "
                             f"got shape {tuple(rank_offsets.shape)}")
        if rank_offsets.dtype.is_floating_point or rank_offsets.dtype == torch.bool:
            raise ValueError(f"rank_offsets must be an integer tensor, got {rank_offsets.dtype}")
        offs = [int(v) for v in rank_offsets.tolist()]
    else:
        offs = [int(v) for v in rank_offsets]
    if len(offs) < 2:
        raise ValueError(f"rank_offsets must have K+1 >= 2 entries, got {offs}")
    if offs[0] != 0 or any(b < a for a, b in zip(offs, offs[1:])):
        raise ValueError(f"rank_offsets must start at 0 and never decrease, got {offs}")
    return offs


def check_scalings(scalings, num_experts: int) -> None:
    if not isinstance(scalings, torch.Tensor) or scalings.dim() != 1:
        raise ValueError(f"scalings must be a 1-D tensor [K], got {type(scalings).__name__} "
                         f"of shape {tuple(getattr(scalings, 'shape', ()))}")
    if scalings.numel() != num_experts:
        raise ValueError(f"scalings has {scalings.numel()} entries but rank_offsets implies "
                         f"K={num_experts} experts")
    if scalings.dtype != torch.float32:
        raise ValueError(f"scalings must be float32, got {scalings.dtype}")


class RankLayout:
    """n blocks of ranks stacked into R rows (see the module doc).

    host:   experts (bank id of each block) [n], offsets [n+1], host_scalings [n] (fp32 values)
    device: rank_offsets [n+1] int32, scalings [n] fp32, expert_ids [n] int64,
            col_expert [R] int64, col_scaling [R] fp32 (the last three built at first use)
    sizes:  num_experts n, total_rank R, max_rank
    """
    _interned: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()

    def __init__(self, rank_offsets, scalings: torch.Tensor, device=None,
                 experts: Sequence[int] | None = None):
        """rank_offsets [n+1] (read on the host: pass a list or a CPU tensor), scalings [n] fp32
        tensor, moved to ``device`` (default: the scalings' device); experts default 0..n-1."""
        offs = host_rank_offsets(rank_offsets)
        n = len(offs) - 1
        check_scalings(scalings, n)
        self.device = torch.device(device) if device is not None else scalings.device
        self.experts = tuple(range(n)) if experts is None else tuple(int(e) for e in experts)
        if len(self.experts) != n:
            raise ValueError(f"experts has {len(self.experts)} ids "
                             f"but rank_offsets implies n={n} blocks")
        self.offsets = tuple(offs)
        self.num_experts, self.total_rank = n, offs[-1]
        self.max_rank = max(b - a for a, b in zip(offs, offs[1:]))
        self.rank_offsets = torch.tensor(offs, dtype=torch.int32).to(self.device)
        self.scalings = scalings.to(self.device)
        self._host_scalings = None
        self._cols = None
        self._expert_ids = None

    @classmethod
    def interned(cls, experts: Sequence[int], ranks: Sequence[int], scalings: Sequence[float],
                 device) -> "RankLayout":
        """The one layout of (experts, ranks, scalings) on ``device``: equal values, one object."""
        s32 = torch.tensor([float(s) for s in scalings], dtype=torch.float32)
        key = (str(torch.device(device)), tuple(int(e) for e in experts),
               tuple(int(r) for r in ranks), tuple(s32.tolist()))
        layout = cls._interned.get(key)
        if layout is None:
            offs = [0]
            for r in key[2]:
                offs.append(offs[-1] + r)
            layout = cls._interned[key] = cls(offs, s32, device, key[1])
            layout._host_scalings = key[3]
        return layout

    @property
    def ranks(self) -> tuple:
        return tuple(b - a for a, b in zip(self.offsets, self.offsets[1:]))

    @property
    def host_scalings(self) -> tuple:
        if self._host_scalings is None:                       # a sync, once, for a device layout
            self._host_scalings = tuple(self.scalings.tolist())
        return self._host_scalings

    @property
    def blocks(self) -> list:
        """[(expert, row0, row1, scaling)] per block: the naive loop's view."""
        o = self.offsets
        return [(e, o[i], o[i + 1], s)
                for i, (e, s) in enumerate(zip(self.experts, self.host_scalings))]

    @property
    def expert_ids(self) -> torch.Tensor:
        """[n] int64 on the device: the gate columns of the blocks (gates[:, expert_ids])."""
        if self._expert_ids is None:
            self._expert_ids = torch.tensor(self.experts, dtype=torch.long).to(self.device)
        return self._expert_ids

    def _columns(self):
        if self._cols is None:
            ranks = torch.tensor(self.ranks)
            col = torch.repeat_interleave(torch.tensor(self.experts, dtype=torch.long), ranks)
            scal = torch.repeat_interleave(torch.tensor(self.host_scalings, dtype=torch.float32),
                                           ranks)
            self._cols = (col.to(self.device), scal.to(self.device))
        return self._cols

    @property
    def col_expert(self) -> torch.Tensor:
        """[R] int64: the bank expert of each rank row."""
        return self._columns()[0]

    @property
    def col_scaling(self) -> torch.Tensor:
        """[R] fp32: the scaling of each rank row."""
        return self._columns()[1]

    def to(self, device) -> "RankLayout":
        """This layout on ``device`` (itself when already there; else the interned one)."""
        if torch.device(device) == self.device:
            return self
        return RankLayout.interned(self.experts, self.ranks, self.host_scalings, device)

    @classmethod
    def concat(cls, layouts: Sequence["RankLayout"]) -> "RankLayout":
        """The blocks of ``layouts`` one after another (rows shifted): a fused group's layout."""
        if not layouts:
            raise ValueError("concat needs at least one layout")
        return cls.interned([e for l in layouts for e in l.experts],
                            [r for l in layouts for r in l.ranks],
                            [s for l in layouts for s in l.host_scalings], layouts[0].device)

    def select(self, experts) -> tuple["RankLayout | None", list[int]]:
        """(the layout of the blocks whose expert is in ``experts``, their row indices in this
        layout); (None, []) when no block is kept."""
        keep = [i for i, e in enumerate(self.experts) if e in experts]
        if not keep:
            return None, []
        rows = [j for i in keep for j in range(self.offsets[i], self.offsets[i + 1])]
        sub = RankLayout.interned([self.experts[i] for i in keep], [self.ranks[i] for i in keep],
                                  [self.host_scalings[i] for i in keep], self.device)
        return sub, rows

    def __repr__(self) -> str:
        return (f"RankLayout(experts={self.experts}, offsets={self.offsets}, "
                f"scalings={self.host_scalings if self._host_scalings is not None else '<device>'}"
                ", "
                f"device={self.device})")
