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
