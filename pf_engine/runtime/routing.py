"""An "auto" request routed from its own prefill: no second pass over the prompt.

The sequence router reads the base model's hidden states entering block ``route`` (their mean
over the prompt: persona/router.py).  Where that block is at or below the bank's first adapted
layer ``split`` (prefix_cache.route_layer), every block below ``split`` runs the base model for
every persona, so the scheduler prefills an "auto" request's prompt in two phases:

    lower   blocks 0..split-1 over the prompt's columns (StepRunner.lower), their KV into the
            slot, keeping the hidden states entering ``route`` and ``split`` [c, 2, d]; the
            prompt's blocks the prefix cache shares (any persona's, or the base model's) give
            theirs with no compute
    route   the router reads the kept states at ``route`` [T, d] -> the gate row; then the
            persona chain of the prefix cache is looked up under it (exact gates: a later
            request routed to the same gates reuses its blocks)
    upper   blocks split.. from the kept states at ``split`` (StepRunner.resume) for the
            columns the persona chain did not give, all but the prompt's last
    then    the last token joins the ordinary prefill (every block, its logits, its first token)

The phases spend the step's prefill budget in whole-model tokens: a column's lower phase costs
split/L of one, its upper phase (L - split)/L (L blocks), so a step stalls the running requests
no longer than an ordinary chunk.  The pending request sits in its slot like any prefilling one;
the ordinary prefill waits while the first prefilling request in slot order is still pending.

Without a router below the split (a bank adapting layer 0, a router reading an adapted layer,
tensor parallelism) the scheduler routes at admission by a pass of its own (Personas.route).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pf_engine.runtime.prefix_cache import persona_root, route_layer, split_layer


@dataclass
class Pending:
    """An "auto" request before its gates are known (``Request.lower``)."""
    done: int                                  # prompt columns whose lower layers are in the slot
    kept: list = field(default_factory=list)   # [c, 2, d] chunks of columns 0..done-1
    shared: list = field(default_factory=list)  # the prefix cache's shared blocks it loaded
    upper: torch.Tensor | None = None          # routed: the states entering split [T, d]


class TwoPhase:
    """The scheduler's two-phase prefill of "auto" requests; ``of`` gives None where the router
    reads a layer the persona may change (see the module docstring)."""

    def __init__(self, engine, runner, route: int, split: int):
        self.runner, self.route, self.split = runner, route, split
        self.layers = engine.config.num_hidden_layers

    @classmethod
    def of(cls, engine, runner) -> "TwoPhase | None":
        route = route_layer(engine)
        return None if route is None else cls(engine, runner, route, split_layer(engine))

    def admit(self, r, prefix) -> None:
        """``r`` (sequence-routed, in its slot, no gates yet): the shared blocks of its prompt
        in ``prefix`` (the scheduler's PrefixCache or None) into the slot; ``advance`` does the
        rest."""
        p, B = prefix, 0
        if p is not None and p.split and p.keep != (self.route, self.split):
            raise ValueError(f"a prefix cache keeping the states entering blocks {p.keep} "
                             f"cannot route from blocks {(self.route, self.split)}")
        shared = p.shared(r.ids, len(r.ids) - 1) if p is not None else []
        if shared:
            B = p.block
            for i, blk in enumerate(shared):
                self.runner.cache.load(r.slot, i * B, blk.kv, p.lower)
        r.lower = Pending(len(shared) * B, [blk.hidden for blk in shared], shared)

    def advance(self, r, left: int, prefix) -> int:
        """Spend up to ``left`` of the step's prefill budget on pending ``r``: its lower phase,
        its routing once the whole prompt's lower layers are in, its upper phase.  Returns the
        budget left; ``r.lower`` is None once only the prompt's last token remains."""
        q, T, L, S = r.lower, len(r.ids), self.layers, self.split
        if q.upper is None:
            take = min(T - q.done, max(1, left * L // S))
            q.kept.append(self.runner.lower(r, q.done, q.done + take, (self.route, S)))
            q.done += take
            left -= -(-take * S // L)
            if q.done < T:
                return left
            self._route(r, prefix)
        end = T - 1
        if r.length < end and left > 0:
            c0 = r.length
            take = min(end - c0, max(1, left * L // (L - S)))
            self.runner.resume(r, c0, c0 + take, q.upper[c0:c0 + take], S)
            r.length += take
            left -= -(-take * (L - S) // L)
        if r.length == end:
            r.lower = None
        return left

    def _route(self, r, p) -> None:
        """The gates from the kept router input of the whole prompt; then the persona chain's
        blocks under them into the slot (prefix_cache.py), and the states the upper phase and
        the prefix cache's insert need."""
        q = r.lower
        h = torch.cat(q.kept)                                        # (T, 2, d)
        r.personas.route_from(0, h[:, 0])
        row = r.personas.rows[0]
        r.active = set(row.nonzero().flatten().tolist())
        q.upper = h[:, 1]
        if p is not None:
            r.prefix_root = root = persona_root(r)
            hit = p.lookup(root, r.ids, len(r.ids) - 1, q.shared)
            for i, blk in enumerate(hit.persona):
                self.runner.cache.load(r.slot, i * p.block, blk.kv, p.upper)
            n, n_p = hit.tokens(p.block), len(hit.persona) * p.block
            r.length, r.cached_tokens = n_p, n
            r.shared_cached_tokens = n - n_p if hit.shared else 0
            r.hidden = [h[n:len(r.ids) - 1]] if p.split else None
        self.runner.admit(r.slot, row, False, r.length)
