"""Preallocated KV cache for a batch of sequences.

Buffers are allocated once per generation for ``max_len`` columns.  All sequences share column
indices: prompts are left-padded so that they end in the same column, and every decode step writes
the same column for every row.  Which columns a row may attend to is the mask's business
(engine.attention_mask), not the cache's.

    k, v: [layers, B, H_kv, max_len, head_dim]
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, H_kv, T, D] into columns start:start+T of ``layer``.

        Returns the filled prefix (columns 0:start+T) of that layer's keys and values, as views.
        """
        end = start + k.shape[2]
        if end > self.max_len:
            raise IndexError(f"KV cache holds {self.max_len} columns; asked to write up to {end}")
        kc, vc = self.k[layer], self.v[layer]
        kc[:, :, start:end] = k
        vc[:, :, start:end] = v
        return kc[:, :, :end], vc[:, :, :end]

    def keep(self, rows: torch.Tensor) -> None:
        """Drop finished sequences: keep only batch ``rows`` (a LongTensor of row indices)."""
        self.k = self.k[:, rows]
        self.v = self.v[:, rows]


class SlotCache:
    """A fixed pool of ``slots`` KV rows for continuous batching (scheduler.py).

        k, v: [layers, slots, H_kv, max_len, head_dim]

    Each request owns one slot while it runs; its tokens fill columns 0..length-1 of that row.
    The running requests occupy slots 0..n-1 (the scheduler moves the last one into a freed
    slot: one row is copied, never the pool), so a decode step reads views of the first n rows.
    """

    def __init__(self, n_layers: int, slots: int, n_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (n_layers, slots, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.slots, self.max_len = slots, max_len

    def prefill_view(self, slot: int, rows: int = 1) -> "KVCache":
        """A KVCache over slots slot..slot+rows-1 (its writes land in the pool)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, slot:slot + rows], self.v[:, slot:slot + rows]
        view.max_len = self.max_len
        return view

    def decode_view(self, lengths: torch.Tensor) -> "DecodeView":
        """Rows 0..n-1, each writing its one new token at column lengths[b] (n = len(lengths))."""
        return DecodeView(self, lengths)

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src``'s row into slot ``dst`` (a request changes slot)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]


class DecodeView:
    """What a decode step's blocks see: ``update`` writes k, v [n, H_kv, 1, D] at each row's own
    column and returns the first n rows up to the longest one, [n, H_kv, max(lengths) + 1, D];
    the attention bias masks each row's columns beyond its own length."""

    def __init__(self, pool: SlotCache, lengths: torch.Tensor):
        self.pool, self.lengths = pool, lengths
        self.rows = torch.arange(len(lengths), device=lengths.device)
        self.end = int(lengths.max()) + 1
        if self.end > pool.max_len:
            raise IndexError(f"KV slot holds {pool.max_len} columns; asked to write column {self.end - 1}")

    def update(self, layer: int, start, k: torch.Tensor, v: torch.Tensor):
        n = len(self.lengths)
        kc, vc = self.pool.k[layer], self.pool.v[layer]
        kc[self.rows, :, self.lengths] = k[:, :, 0]
        vc[self.rows, :, self.lengths] = v[:, :, 0]
        return kc[:n, :, :self.end], vc[:n, :, :self.end]
