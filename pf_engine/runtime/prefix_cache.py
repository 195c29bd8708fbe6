"""Prompt KV kept across requests: blocks of ``block`` tokens keyed by the token prefix and by
what shapes that KV, evicted least recently used under a byte budget.

    cache = PrefixCache.for_engine(engine, gb=1.0)
    root = persona_root(request)                    # None: this request's KV is not shared
    hit = cache.lookup(root, ids, limit)            # the longest cached run of whole blocks
    cache.insert(root, ids, n, save)                # a prompt's first n tokens, once prefilled

Why a root.  The k and v projections are adapted by the persona experts, so the KV of a prefix
depends on the gates as well as on the tokens: a cache keyed by tokens alone would hand one
persona's KV to another.  The root names what the KV of a request's prompt is a function of,
within one engine (one base model, dtype and backend):

    base model (no persona)       ("base",)
    explicit weights, "auto"      ("gates", bank, the gate row as exact floats): "auto" is keyed
                                  by the row its router gave, so the router reads the whole
                                  prompt first (correct: two prompts with one system prompt but
                                  different user turns may route differently, and then share
                                  nothing)
    token routing                 ("token", bank): its gates are a causal function of the tokens
                                  (the router reads each token's own hidden state), so the
                                  tokens and the bank decide the KV

Blocks.  Block i of a prompt (tokens i*B .. i*B+B-1) is stored under the key (parent, tokens),
parent = the root for block 0, else block i-1's entry id (ids are never reused), so a lookup
walks from the root and a hit is always a whole prefix.  Each block holds ``kv``, what the slot
pool's ``save`` copied out of a slot (kv_cache.SlotCache: k, v [layers, H_kv, B, head_dim];
under tensor parallelism every rank's own heads: parallel/runtime.TPSlotCache), which its
``load`` copies into the next request's slot on a hit.  A hit covers whole blocks only, and never
the prompt's last token
(its logits give the first new token): a prefix ending inside a block is prefilled from that
block's start.

Eviction: least recently used first; a lookup touches a chain from its last block back to its
first, so a parent is always more recent than its children and leaves go first (an orphaned
child, possible only after an insert evicts, is never reachable and ages out).
"""
from __future__ import annotations

import collections
import itertools
import os
from dataclasses import dataclass

import torch

from pf_engine.errors import RequestError
from pf_engine.persona.specs import BASE, TOKEN

BLOCK = 16                      # tokens per block
PREFIX_CACHE_GB = 1.0           # the default budget (Engine.prefix_cache_gb, --prefix-cache-gb)


def default_gb():
    """The default budget: $PF_PREFIX_CACHE_GB when set, else PREFIX_CACHE_GB."""
    v = os.environ.get("PF_PREFIX_CACHE_GB")
    if v is None:
        return PREFIX_CACHE_GB
    try:
        return float(v)
    except ValueError:
        return v                # for_engine names it


@dataclass
class Block:
    id: int
    kv: object                  # SlotCache.save's copy: (k, v), each [layers, H_kv, B, D]


@dataclass
class CacheStats:
    lookups: int = 0            # requests that looked
    hits: int = 0               # requests that found at least one block
    hit_tokens: int = 0         # prompt tokens not prefilled thanks to the cache
    inserted: int = 0           # blocks stored
    evictions: int = 0          # blocks dropped for room


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int, layers: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype):
        self.block = block
        self.block_bytes = 2 * layers * kv_heads * block * head_dim * dtype.itemsize
        self.capacity = int(budget_bytes // self.block_bytes)
        self.budget_bytes = budget_bytes
        self._blocks: collections.OrderedDict[tuple, Block] = collections.OrderedDict()
        self._ids = itertools.count()
        self.stats = CacheStats()

    @classmethod
    def for_engine(cls, engine, gb: float, block: int = BLOCK) -> "PrefixCache | None":
        """A cache of ``gb`` GiB for this engine's KV layout; None for gb == 0 (off)."""
        ok = isinstance(gb, (int, float)) and not isinstance(gb, bool) and gb >= 0
        if not ok:
            raise RequestError(f"prefix_cache_gb={gb!r}: expected a number >= 0 (0: off)")
        if gb == 0:
            return None
        c = engine.model.cfg             # a tensor-parallel rank's: the heads this process keeps
        return cls(int(gb * 2 ** 30), block, c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                   engine.model.dtype)

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    @property
    def bytes(self) -> int:
        return len(self._blocks) * self.block_bytes

    def _chain(self, root: tuple, ids: list[int], n_blocks: int):
        """Yields (key, block or None) for blocks 0.. of ids while they are cached."""
        parent = root
        B = self.block
        for i in range(n_blocks):
            key = (parent, tuple(ids[i * B:(i + 1) * B]))
            blk = self._blocks.get(key)
            yield key, blk
            if blk is None:
                return
            parent = blk.id

    def lookup(self, root: tuple, ids: list[int], limit: int) -> list[Block]:
        """The cached blocks of the longest prefix of ``ids`` under ``root``, covering at most
        ``limit`` tokens; touched as most recently used (last block first)."""
        self.stats.lookups += 1
        hit = []
        for key, blk in self._chain(root, ids, limit // self.block):
            if blk is None:
                break
            hit.append((key, blk))
        for key, _ in reversed(hit):
            self._blocks.move_to_end(key)
        if hit:
            self.stats.hits += 1
            self.stats.hit_tokens += len(hit) * self.block
        return [blk for _, blk in hit]

    def insert(self, root: tuple, ids: list[int], n_tokens: int, save) -> int:
        """Store the whole blocks of ids[:n_tokens] not cached yet; ``save(c0, c1)`` copies out
        columns c0:c1 of the request's KV (SlotCache.save).  At most ``capacity`` blocks of one
        prompt are kept.  Returns the blocks added."""
        n_blocks = min(n_tokens // self.block, self.capacity)
        added, parent, B = 0, root, self.block
        for i in range(n_blocks):
            key = (parent, tuple(ids[i * B:(i + 1) * B]))
            blk = self._blocks.get(key)
            if blk is None:
                while len(self._blocks) >= self.capacity:
                    self._blocks.popitem(last=False)
                    self.stats.evictions += 1
                c0, c1 = i * B, (i + 1) * B
                blk = Block(next(self._ids), save(c0, c1))
                self._blocks[key] = blk
                self.stats.inserted += 1
                added += 1
            else:
                self._blocks.move_to_end(key)
            parent = blk.id
        return added

    def clear(self) -> None:
        self._blocks.clear()


def persona_root(req) -> tuple | None:
    """What the KV of ``req``'s prompt depends on besides its tokens (see the module doc); call
    after routing (its gate row is known)."""
    if req.kind == BASE:
        return ("base",)
    bank = id(req.personas.bank)
    if req.kind == TOKEN:
        return ("token", bank)
    return ("gates", bank, tuple(req.personas.rows[0].tolist()))
