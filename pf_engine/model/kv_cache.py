"""The scheduler's KV pool: ``SlotCache`` holds a row of columns per request in flight, and
``RowsView`` is what the blocks of one forward see of it (every row writing at its own columns).
A pass over whole sequences needs no cache (model.decoder.SCRATCH).  The scheduler sizes the
pool (runtime/config.py: slots given, or as many as a memory budget holds).

    k, v: [layers, slots, H_kv, max_len, head_dim]
"""
from __future__ import annotations

import torch



class SlotCache:
    """A fixed pool of ``slots`` KV rows for continuous batching (runtime/scheduler.py).

        k, v: [layers, slots, H_kv, max_len, head_dim]

    Each request owns one slot while it runs; its tokens fill columns 0..length-1 of that row.
    The scheduler keeps its requests in slots 0..n-1 (it moves one into a freed slot: the used
    columns of one row are copied, never the pool), so a forward reads views of consecutive rows.
    """

    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (n_layers, slots, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len = slots, max_len

    @classmethod
    def for_model(cls, cfg, slots: int, max_len: int, dtype: torch.dtype, device, **extra):
        """The pool for a model of config ``cfg`` (its layers and KV heads; a tensor-parallel
        shard's config holds its own heads): the one way every pool is built."""
        return cls(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim,
                   dtype, device, **extra)

    def rows_view(self, s0: int, starts: list[int], counts: list[int]) -> "RowsView":
        """Slots s0..s0+m-1 (m = len(starts)), row b writing its counts[b] new tokens at columns
        starts[b]..starts[b]+counts[b]-1: a prefill chunk, or a decode step (every count 1)."""
        return RowsView(self, s0, starts, counts)

    def spread_view(self, slots: list[int], cols: list[int]) -> "RowsView":
        """One token per row, row r at column cols[r] of slot slots[r] (RowsView.spread)."""
        return RowsView.spread(self, slots, cols)

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` columns of slot ``src`` into slot ``dst`` (a request changes
        slot; columns beyond its length are never read before they are written)."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def save(self, slot: int, c0: int, c1: int, layers: slice = slice(None)):
        """Columns c0:c1 of ``slot``'s keys and values in ``layers``, copied out ([layers,
        H_kv, c1 - c0, D] each): a prefix-cache block, which ``load`` writes back."""
        return (self.k[layers, slot, :, c0:c1].clone(), self.v[layers, slot, :, c0:c1].clone())

    def load(self, slot: int, c0: int, kv, layers: slice = slice(None)) -> None:
        """A block from ``save`` (of the same ``layers``) into ``slot`` from column c0 on."""
        k, v = kv
        self.k[layers, slot, :, c0:c0 + k.shape[2]] = k
        self.v[layers, slot, :, c0:c0 + v.shape[2]] = v


class RowsView:
    """What the blocks of one scheduler forward see, for m consecutive slots with a right-padded
    chunk of T = max(counts) tokens each: ``update`` writes row b's counts[b] real tokens at
    columns starts[b].. (padding is not written) and returns views of the m rows up to
    end = max(starts + counts) columns, [m, H_kv, end, D].  ``mask`` says which of them each
    query sees; ``positions`` are the tokens' positions.  Index tensors are built once here,
    not per layer.
    """

    spread_rows = False          # rows at slots s0.. in order; spread(): each row its own slot

    def __init__(self, pool: SlotCache, s0: int, starts: list[int], counts: list[int]):
        self.pool, self.s0, self.m, self.starts, self.counts = pool, s0, len(starts), starts, counts
        self.T = max(counts)
        self.end = max(s + c for s, c in zip(starts, counts))
        if self.end > pool.max_len:
            raise IndexError(f"KV slot holds {pool.max_len} columns; "
                             f"asked to write column {self.end - 1}")
        dev = pool.k.device
        start = torch.tensor(starts, device=dev).view(-1, 1)
        t = torch.arange(self.T, device=dev).view(1, -1)
        self.valid = t < torch.tensor(counts, device=dev).view(-1, 1)           # [m, T]
        self.positions = start + t                                              # [m, T]
        if self.T == 1:
            self.rows, self.cols = torch.arange(self.m, device=dev) + s0, self.positions[:, 0]
        else:
            b, tt = self.valid.nonzero(as_tuple=True)
            self.rows, self.cols, self.sel = b + s0, self.positions[b, tt], (b, tt)

    @classmethod
    def static(cls, pool: SlotCache, nb: int, lengths: torch.Tensor, end: int) -> "RowsView":
        """A decode view built from device tensors only (runtime/static_decode.py):
        rows 0..nb-1 write
        at columns ``lengths`` [nb] and read columns :end (a fixed bucket, not the longest row)."""
        view = cls.__new__(cls)
        view.pool, view.s0, view.m, view.T, view.end = pool, 0, nb, 1, end
        view.starts, view.counts = None, [1] * nb
        view.positions = lengths.view(nb, 1)
        view.valid = torch.ones(nb, 1, dtype=torch.bool, device=lengths.device)
        view.rows, view.cols = torch.arange(nb, device=lengths.device), lengths
        return view

    @classmethod
    def spread(cls, pool: SlotCache, slots: list[int], cols: list[int]) -> "RowsView":
        """A decode-shaped view whose row r is one token of slot slots[r] at column cols[r]; rows
        may share a slot (several tokens of one request, in column order: speculative decoding's
        verify, runtime/speculative.py).  Every row's k, v is written before any row attends,
        and row r sees its slot's columns up to cols[r]: the same step as decoding those tokens
        one by one, row for row."""
        view = cls.__new__(cls)
        dev = pool.k.device
        view.pool, view.s0, view.m, view.T = pool, 0, len(slots), 1
        view.starts, view.counts, view.spread_rows = list(cols), [1] * len(slots), True
        view.end = max(cols) + 1
        if view.end > pool.max_len:
            raise IndexError(f"KV slot holds {pool.max_len} columns; "
                             f"asked to write column {view.end - 1}")
        view.positions = torch.tensor(cols, device=dev).view(-1, 1)
        view.valid = torch.ones(len(slots), 1, dtype=torch.bool, device=dev)
        view.rows, view.cols = torch.tensor(slots, device=dev), view.positions[:, 0]
        return view

    def mask(self, window: int | None) -> torch.Tensor:
        """bool [m, 1, T, end]: query t of row b sees column j iff j <= starts[b] + t (and, with a
        sliding window, starts[b] + t - j < window).  A padding query sees its row's real columns
        and columns it did not write, whose outputs are never used."""
        j = torch.arange(self.end, device=self.positions.device).view(1, 1, -1)
        q = self.positions.unsqueeze(-1)                                        # [m, T, 1]
        ok = j <= q
        if window is not None:
            ok &= (q - j) < window
        return ok.unsqueeze(1)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v [m, H_kv, T, D] -> the m rows' keys and values [m, H_kv, end, D] (views)."""
        kc, vc = self.pool.k[layer], self.pool.v[layer]
        if self.spread_rows:                                # each row its own slot (a gather)
            kc[self.rows, :, self.cols] = k[:, :, 0]
            vc[self.rows, :, self.cols] = v[:, :, 0]
            return kc[self.rows, :, :self.end], vc[self.rows, :, :self.end]
        if self.m == 1 and self.starts is not None:   # one row: a slice write, not an index
            c0, c1 = self.starts[0], self.starts[0] + self.counts[0]
            kc[self.s0, :, c0:c1] = k[0, :, :c1 - c0]
            vc[self.s0, :, c0:c1] = v[0, :, :c1 - c0]
        elif self.T == 1:
            kc[self.rows, :, self.cols] = k[:, :, 0]
            vc[self.rows, :, self.cols] = v[:, :, 0]
        else:
            b, t = self.sel
            kc[self.rows, :, self.cols] = k.transpose(1, 2)[b, t]
            vc[self.rows, :, self.cols] = v.transpose(1, 2)[b, t]
        s = slice(self.s0, self.s0 + self.m)
        return kc[s, :, :self.end], vc[s, :, :self.end]
