"""Prompt KV kept across requests: blocks of ``block`` tokens keyed by the token prefix and by
what shapes that KV, evicted least recently used under a byte budget.

    cache = PrefixCache.for_engine(engine, gb=1.0)
    root = persona_root(request)                    # None: this request's KV is not shared
    hit = cache.lookup(root, ids, limit)            # the longest cached runs of whole blocks
    cache.insert(root, ids, n, save_shared, save_persona)   # a prompt's first n tokens

Why a root.  The k and v projections are adapted by the persona experts, so the KV of a prefix
depends on the gates as well as on the tokens: a cache keyed by tokens alone would hand one
persona's KV to another.  The root names what the KV of a request's prompt is a function of,
within one engine (one base model, dtype and backend):

    base model (no persona)       ("base",)
    explicit weights, "auto"      ("gates", bank, the gate row as exact floats): "auto" is keyed
                                  by the row its router gave, so a later request routed to the
                                  same gates reuses it (the router reads the prompt's lower
                                  layers first: routing.py)
    token routing                 ("token", bank): its gates are a causal function of the tokens
                                  (the router reads each token's own hidden state), so the
                                  tokens and the bank decide the KV

Layers below the first adapted one.  A bank stores experts only in the layers it adapts
(persona/bank.py trims the rest): below its first adapted layer ``split`` the KV of a prefix is
the base model's whatever the persona, and the hidden state entering layer ``split`` too.  So a
block is kept in two parts:

    shared   under ("shared",), tokens only:  the KV of layers [0, split) and h, the hidden
             states entering the blocks ``keep`` [B, len(keep), d]: layer split, and first the
             layer the sequence router reads where it is below (``route_layer``); one for every
             persona and the base model
    persona  under the request's root:         the KV of layers [split, L)

A hit is the shared chain's blocks (n_s) and the persona chain's (n_p <= n_s, the longer part
dropped): the slot gets both, and the persona part of blocks n_p..n_s-1 is computed from their
h by layers split..L-1 alone (``StepRunner.resume``): a prompt's lower layers are never
computed twice, whatever persona asks.  An "auto" request looks up the shared chain first, routes
from its blocks' kept router input and its own lower layers, then looks up its persona chain
(routing.py).  Without a bank, with a bank that adapts layer 0, or under
tensor parallelism (the workers keep their own heads), ``split`` is 0: one chain of whole
blocks under the request's root, as before.

Blocks.  Block i of a prompt (tokens i*B .. i*B+B-1) is stored under the key (parent, tokens),
parent = the chain's root for block 0, else block i-1's entry id (ids are never reused), so a
lookup walks from the root and a hit is always a whole prefix.  ``kv`` is what the slot pool's
``save`` copied out of a slot (kv_cache.SlotCache: k, v [layers, H_kv, B, head_dim]; under
tensor parallelism every rank's own heads: parallel/runtime.TPSlotCache), which its ``load``
copies into the next request's slot on a hit.  A hit covers whole blocks only, and never the
prompt's last token (its logits give the first new token): a prefix ending inside a block is
prefilled from that block's start.

Eviction: least recently used first, until the blocks' bytes fit the budget; a lookup touches a
chain from its last block back to its first, so a parent is always more recent than its
children and leaves go first (an orphaned child, possible only after an insert evicts, is never
reachable and ages out).
"""
from __future__ import annotations

import collections
import itertools
import os
from dataclasses import dataclass, field

import torch

from pf_engine.errors import RequestError
from pf_engine.persona.specs import BASE, TOKEN

BLOCK = 16                      # tokens per block
PREFIX_CACHE_GB = 1.0           # the default budget (Engine.prefix_cache_gb, --prefix-cache-gb)
SHARED = ("shared",)            # the root of the persona-independent chain


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
    hidden: torch.Tensor | None = None  # shared blocks: [B, len(keep), d] (see the module doc)
    nbytes: int = 0


@dataclass
class Hit:
    shared: list = field(default_factory=list)    # blocks 0..n_s-1 of the shared chain
    persona: list = field(default_factory=list)   # blocks 0..n_p-1 of the persona chain

    def tokens(self, block: int) -> int:
        """Prompt tokens whose KV the hit gives (every layer, after ``resume``)."""
        return block * max(len(self.shared), len(self.persona))


@dataclass
class CacheStats:
    lookups: int = 0            # requests that looked
    hits: int = 0               # requests that found at least one block
    hit_tokens: int = 0         # prompt tokens not prefilled thanks to the cache
    shared_hit_tokens: int = 0  # of them, tokens whose persona layers were computed from h
    inserted: int = 0           # blocks stored
    evictions: int = 0          # blocks dropped for room


class PrefixCache:
    def __init__(self, budget_bytes: int, block: int, layers: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, split: int = 0, hidden: int = 0, route: int | None = None):
        self.block, self.split, self.layers = block, split, layers
        self.keep = () if not split else (split,) if route is None else (route, split)
        per_layer = 2 * kv_heads * block * head_dim * dtype.itemsize
        self.shared_bytes = (split * per_layer + block * hidden * len(self.keep) * dtype.itemsize
                             if split else 0)
        self.persona_bytes = (layers - split) * per_layer
        self.block_bytes = self.shared_bytes + self.persona_bytes    # one block, both parts
        self.capacity = int(budget_bytes // self.block_bytes)       # blocks of one prompt, at most
        self.budget_bytes = budget_bytes
        self._blocks: collections.OrderedDict[tuple, Block] = collections.OrderedDict()
        self._bytes = 0
        self._ids = itertools.count()
        self.stats = CacheStats()

    @classmethod
    def for_engine(cls, engine, gb: float, block: int = BLOCK,
                   shared: bool = True) -> "PrefixCache | None":
        """A cache of ``gb`` GiB for this engine's KV layout; None for gb == 0 (off).
        ``shared`` False: every block keyed by the persona too (split 0; benchmarks compare)."""
        ok = isinstance(gb, (int, float)) and not isinstance(gb, bool) and gb >= 0
        if not ok:
            raise RequestError(f"prefix_cache_gb={gb!r}: expected a number >= 0 (0: off)")
        if gb == 0:
            return None
        c = engine.model.cfg             # a tensor-parallel rank's: the heads this process keeps
        return cls(int(gb * 2 ** 30), block, c.num_hidden_layers, c.num_key_value_heads, c.head_dim,
                   engine.model.dtype, split_layer(engine) if shared else 0, c.hidden_size,
                   route_layer(engine) if shared else None)

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    @property
    def bytes(self) -> int:
        return self._bytes

    @property
    def lower(self) -> slice:
        """The layers a shared block holds."""
        return slice(0, self.split)

    @property
    def upper(self) -> slice:
        """The layers a persona block holds (all of them when split is 0)."""
        return slice(self.split, None)

    def _chain(self, root: tuple, ids: list[int], n_blocks: int) -> list:
        """[(key, block)] for blocks 0.. of ids under ``root`` while they are cached."""
        out, parent, B = [], root, self.block
        for i in range(n_blocks):
            key = (parent, tuple(ids[i * B:(i + 1) * B]))
            blk = self._blocks.get(key)
            if blk is None:
                break
            out.append((key, blk))
            parent = blk.id
        return out

    def shared(self, ids: list[int], limit: int) -> list:
        """The shared chain's cached blocks of the longest prefix of ``ids`` covering at most
        ``limit`` tokens, touched as most recently used (last block first); [] when split is 0.
        ``lookup`` with them finishes the lookup once the root is known (an "auto" request's)."""
        shared = self._chain(SHARED, ids, limit // self.block) if self.split else []
        for key, _ in reversed(shared):
            self._blocks.move_to_end(key)
        return [b for _, b in shared]

    def lookup(self, root: tuple, ids: list[int], limit: int, shared: list | None = None) -> Hit:
        """The cached blocks of the longest prefix of ``ids`` covering at most ``limit`` tokens:
        the shared chain's (``shared`` when given: ``self.shared``'s) and ``root``'s (no longer
        than the shared one when split > 0), touched as most recently used (last block first)."""
        self.stats.lookups += 1
        if shared is None:
            shared = self.shared(ids, limit)
        persona = self._chain(root, ids, len(shared) if self.split else limit // self.block)
        for key, _ in reversed(persona):
            self._blocks.move_to_end(key)
        hit = Hit(shared, [b for _, b in persona])
        if hit.shared or hit.persona:
            self.stats.hits += 1
            self.stats.hit_tokens += hit.tokens(self.block)
            self.stats.shared_hit_tokens += self.block * (len(hit.shared) - len(hit.persona)
                                                          if hit.shared else 0)
        return hit

    def insert(self, root: tuple, ids: list[int], n_tokens: int, save_shared, save_persona) -> int:
        """Store the whole blocks of ids[:n_tokens] not cached yet: ``save_shared(c0, c1)`` ->
        (kv of the lower layers, h [c1 - c0, len(keep), d]) or None (not available: the shared
        chain stops there), ``save_persona(c0, c1)`` -> the kv of the upper layers (all of them
        when split is 0).
        At most ``capacity`` blocks of one prompt are kept.  Returns the blocks added."""
        n_blocks = min(n_tokens // self.block, self.capacity)
        added = 0
        if self.split:
            n_blocks, got = self._insert(SHARED, ids, n_blocks, save_shared, self.shared_bytes)
            added += got
        return added + self._insert(root, ids, n_blocks, save_persona, self.persona_bytes)[1]

    def _insert(self, root, ids, n_blocks: int, save, nbytes: int) -> tuple[int, int]:
        """Blocks 0..n_blocks-1 of one chain: (how many it now holds in a row, how many added)."""
        added, parent, B = 0, root, self.block
        for i in range(n_blocks):
            key = (parent, tuple(ids[i * B:(i + 1) * B]))
            blk = self._blocks.get(key)
            if blk is None:
                got = save(i * B, (i + 1) * B)
                if got is None:
                    return i, added
                while self._blocks and self._bytes + nbytes > self.budget_bytes:
                    _, old = self._blocks.popitem(last=False)
                    self._bytes -= old.nbytes
                    self.stats.evictions += 1
                kv, h = got if self.split and root is SHARED else (got, None)
                blk = Block(next(self._ids), kv, h, nbytes)
                self._blocks[key] = blk
                self._bytes += nbytes
                self.stats.inserted += 1
                added += 1
            else:
                self._blocks.move_to_end(key)
            parent = blk.id
        return n_blocks, added

    def clear(self) -> None:
        self._blocks.clear()
        self._bytes = 0


def split_layer(engine) -> int:
    """The first layer whose KV may depend on the persona: the bank's first adapted layer (every
    layer below runs the base model for every request), or 0 where nothing is shared across
    personas: no bank, or tensor parallelism (each rank keeps its own heads; its workers hold
    the cache's other parts)."""
    bank = engine.bank
    if bank is None or engine.tensor_parallel > 1:
        return 0
    first = bank.layers()[0] if bank.layers() else engine.config.num_hidden_layers
    return first if first < engine.config.num_hidden_layers else 0


def route_layer(engine) -> int | None:
    """The layer whose input the bank's sequence router reads, where that is at or below a split
    > 0: the prefill then computes it with the lower layers, before the gates are known (an "auto"
    request's first phase, routing.py), and shared blocks keep it.  None: "auto" is routed by a
    pass of its own over the prompt (Personas.route)."""
    router = engine.bank.router if engine.bank is not None else None
    split = split_layer(engine)
    return router.layer if router is not None and split and router.layer <= split else None


def persona_root(req) -> tuple | None:
    """What the KV of ``req``'s prompt depends on besides its tokens (see the module doc); call
    after routing (its gate row is known)."""
    if req.kind == BASE:
        return ("base",)
    bank = req.personas.bank.digest           # its content: a bank changed at run time differs
    if req.kind == TOKEN:
        return ("token", bank)
    return ("gates", bank, tuple(req.personas.rows[0].tolist()))
