"""Which replica serves a request: persona- and prefix-aware routing for pf-serve's replicas
(ray_serve.py), kept free of Ray so its choices can be tested and reasoned about alone.

    key = affinity_key(body, kind)            # (persona, prefix): hashes of the request's
    policy = AffinityPolicy(margin=4)         # persona and of its system prompt
    replica = policy.choose(key, {replica: queue length, ...})

The prefix cache (runtime/prefix_cache.py) shares a system prompt's lower layers across every
persona and keeps its upper layers per persona.  So a request is best served by the replica that
last served the same persona on the same system prompt (every layer cached there), next by the
one that last served the same system prompt under any persona (the shared layers cached), unless
that replica's queue is longer than the shortest one's by more than ``margin`` requests; else by
the power of two choices (two replicas drawn at random, the shorter queue).  Each decision is
counted by its reason:

    persona   the replica of the same (persona, prefix)       prefix   the same prefix only
    load      an affine replica was too busy                  new      nothing known: two choices

The prefix is the chat's system message (its first message when there is none), or a
completion prompt's first PREFIX_CHARS characters (PREFIX_TOKENS ids); the persona is the model id
with the request's ``persona`` field.  Keys are remembered for the last ``remember`` requests.
"""
from __future__ import annotations

import collections
import hashlib
import json
import random

PREFIX_CHARS = 2048
PREFIX_TOKENS = 512
REASONS = ("persona", "prefix", "load", "new")
_POLICIES: list = []            # this process's routers' policies (the ingress's /metrics)


def register(policy: "AffinityPolicy") -> None:
    _POLICIES.append(policy)


def total_counts() -> dict[str, int]:
    """The decisions of every policy registered in this process, by reason."""
    return {r: sum(p.counts[r] for p in _POLICIES) for r in REASONS}


def _digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def affinity_key(body, kind: str) -> tuple[str, str]:
    """(persona hash, prefix hash) of a completion request's JSON body (kind "chat" or
    "completion"); a malformed body gets a key too (the replica answers its error)."""
    if not isinstance(body, dict):
        return _digest(None), _digest(None)
    persona = _digest([body.get("model"), body.get("persona")])
    if kind == "chat":
        msgs = body.get("messages")
        first = None
        if isinstance(msgs, list) and msgs:
            system = [m for m in msgs if isinstance(m, dict) and m.get("role") == "system"]
            first = (system or msgs)[0]
            first = first.get("content") if isinstance(first, dict) else first
        return persona, _digest(first)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]                        # a batch: its first prompt
    if isinstance(prompt, str):
        prompt = prompt[:PREFIX_CHARS]
    elif isinstance(prompt, list):
        prompt = prompt[:PREFIX_TOKENS]
    return persona, _digest(prompt)


class AffinityPolicy:
    """See the module docstring.  ``rng``: the two choices' draws (seeded in tests)."""

    def __init__(self, margin: int = 4, remember: int = 10000, rng: random.Random | None = None):
        if not isinstance(margin, int) or isinstance(margin, bool) or margin < 0:
            raise ValueError(f"margin={margin!r}: expected an integer >= 0 (requests)")
        self.margin, self.remember = margin, remember
        self.rng = rng or random.Random()
        self.by_key: collections.OrderedDict = collections.OrderedDict()     # (p, prefix) -> id
        self.by_prefix: collections.OrderedDict = collections.OrderedDict()  # prefix -> id
        self.counts = {r: 0 for r in REASONS}

    def choose(self, key: tuple[str, str], queues: dict) -> object:
        """The replica (a key of ``queues``: replica -> requests queued or running there) for a
        request of ``key``; remembers it for the key and its prefix."""
        if not queues:
            raise ValueError("no replica to choose from")
        least = min(queues.values())
        pick, reason, affine = None, "new", False
        for known, why in ((self.by_key.get(key), "persona"),
                           (self.by_prefix.get(key[1]), "prefix")):
            if known in queues:
                affine = True
                if queues[known] <= least + self.margin:
                    pick, reason = known, why
                    break
        if pick is None:
            reason = "load" if affine else "new"
            ids = list(queues)
            two = self.rng.sample(ids, 2) if len(ids) > 1 else ids
            pick = min(two, key=lambda r: queues[r])
        self.counts[reason] += 1
        self._note(self.by_key, key, pick)
        self._note(self.by_prefix, key[1], pick)
        return pick

    def forget(self, replica) -> None:
        """A replica that died: its keys go (their next requests are routed afresh)."""
        for table in (self.by_key, self.by_prefix):
            for k in [k for k, v in table.items() if v == replica]:
                del table[k]

    def _note(self, table: collections.OrderedDict, key, replica) -> None:
        table[key] = replica
        table.move_to_end(key)
        while len(table) > self.remember:
            table.popitem(last=False)
