"""The step runner: every tensor of a step.  The scheduler (scheduler.py) decides which requests
run and how many tokens each; it hands the runner a ``Plan`` and the runner builds the inputs
once, runs the model (eagerly, or a static step captured in a CUDA graph), masks, samples,
computes logprobs and hands each request its token:

    request -> Scheduler (plan) -> StepRunner.run -> model -> sample -> Request.emit

What it owns, one row per KV slot (slot i belongs to the scheduler's running[i]):

    cache      kv_cache.SlotCache  [layers, slots, H_kv, max_len, D] keys and values
    gates      [slots, K] fp32     each slot's persona gate row (zero: the base model)
    token_rows [slots] bool        the slot is routed per token (the token router's gates)
    last_tok   [slots] long        each slot's last sampled token: a decode step's input
    static     StaticDecode | None the static-shape decode (static_decode.py), which keeps its
                                   own device copy of each slot's length

The scheduler tells it what changes a slot: ``admit`` (a request's gate row, its length after
the prefix cache's blocks were copied in with ``cache.load``), ``move`` (a request changes slot).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import cached_property

import torch

from pf_engine.model.step import Step
from pf_engine.persona.mix import Mix
from pf_engine.persona.specs import BASE, TOKEN
from pf_engine.runtime.speculative import accepted, sampled
from pf_engine.runtime.static_decode import CaptureFailed, StaticDecode
from pf_engine.generation.sampling import greedy
from pf_engine.generation.scoring import logprobs_of
from pf_engine.generation.structured import mask_rows


@dataclass(frozen=True)
class Plan:
    """One forward over the consecutive slots of ``reqs`` (slot order, the first at slot s0).

    Row b writes counts[b] new tokens from column starts[b] (its request's length).  A prefill
    plan gives the rows' token ids (``tokens``, each row counts[b] long); a decode plan gives
    none: every row's input is its slot's last sampled token and every count is 1.  The first
    ``sample`` rows sample their next token (in a prefill, the rows whose prompt this chunk
    completes; in a decode, all).  ``keep`` (a prefill; block indices): also hand back the hidden
    states entering those blocks (the prefix cache's shared part and the sequence router's input:
    prefix_cache.py, routing.py)."""

    reqs: list
    starts: list[int]
    counts: list[int]
    tokens: list[list[int]] | None
    sample: int
    keep: tuple[int, ...] = ()

    @classmethod
    def decode_of(cls, reqs: list) -> "Plan":
        """A decode step for ``reqs``: one token each, at the column after its last."""
        return cls(reqs, [r.length for r in reqs], [1] * len(reqs), None, len(reqs))

    @property
    def decode(self) -> bool:
        return self.tokens is None

    @property
    def s0(self) -> int:
        return self.reqs[0].slot

    @cached_property
    def step(self) -> Step:
        """What kind of forward this is (model/step.py), decided here once for the model, the
        backend and the static decode: decode or prefill, any persona, any token routing."""
        return Step(self.decode, any(r.kind != BASE for r in self.reqs),
                    any(r.kind == TOKEN for r in self.reqs))


class StepRunner:
    """The tensors of the scheduler's steps; see the module docstring.  decode: "dynamic",
    "static" or "graphs" (static_decode.py)."""

    def __init__(self, engine, slots: int, max_len: int, decode: str):
        self.engine, self.max_len = engine, max_len
        self.cache = engine.model.slot_cache(slots, max_len)  # this rank's heads (tensor parallel)
        K = engine.bank.num_experts if engine.bank is not None else 0
        dev = engine.device
        self.gates = torch.zeros(slots, K, dtype=torch.float32, device=dev)
        self.token_rows = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.last_tok = torch.zeros(slots, dtype=torch.long, device=dev)
        self.static = None if decode == "dynamic" else StaticDecode(self, decode == "graphs")

    @property
    def slots(self) -> int:
        return self.cache.slots

    # what the scheduler changes ---------------------------------------------------------------
    def admit(self, slot: int, row: torch.Tensor | None, token: bool, length: int) -> None:
        """Slot ``slot`` now holds a request: its gate row [K] (None: the base model), whether
        it is token-routed, and its columns already filled (from the prefix cache)."""
        if row is None:
            self.gates[slot] = 0
        else:
            self.gates[slot] = row.to(self.gates.device)
        self.token_rows[slot] = token
        if self.static is not None:
            self.static.lengths[slot] = length

    def move(self, src: int, dst: int, length: int) -> None:
        """The request in slot ``src`` (``length`` columns filled) moves to slot ``dst``."""
        self.cache.move(src, dst, length)
        self.gates[dst], self.token_rows[dst] = self.gates[src], self.token_rows[src]
        self.last_tok[dst] = self.last_tok[src]
        if self.static is not None:
            self.static.lengths[dst] = self.static.lengths[src]

    # the step -----------------------------------------------------------------------------------
    def run(self, plan: Plan) -> torch.Tensor | None:
        """Run ``plan``: the forward, then the first ``plan.sample`` rows' next tokens handed to
        their requests; returns the hidden states [n, T, len(keep), d] entering the blocks
        ``plan.keep`` (None without).  A decode step runs under one thread policy with its sampling
        (backends/threads.py:
        torch's argmax over the vocabulary would otherwise wake its OpenMP workers, whose
        spinning afterwards takes the cores from the next step's kernels)."""
        eng = self.engine
        if not plan.decode:
            logits, kept = self._forward(plan)
            self._sample(plan.reqs[:plan.sample], logits[:plan.sample], plan.s0)
            if self.static is not None:
                ends = [s + c for s, c in zip(plan.starts, plan.counts)]
                self.static.lengths[plan.s0:plan.s0 + len(ends)] = torch.tensor(ends)
            return kept
        with eng.backend.policy.forward(eng.device, eng.backend.own_threads(len(plan.reqs))):
            logits = self._decode(plan)
            self._sample_rows(plan.reqs, logits, plan.s0)
        return None

    @property
    def speculates(self) -> bool:
        """Whether ``verify`` can run: a dynamic decode on a pool with spread views."""
        return self.static is None and getattr(self.cache, "spread_view", None) is not None

    def verify(self, reqs: list, drafts: list[list[int]]) -> list[int]:
        """A decode step in which some rows verify a draft (speculative.py).  Every token is a
        row of its own, as in a decode step of that many rows: request b's last token and its
        draft at its next columns (a spread view: rows sharing its slot), so each token's logits
        are those decoding it would give.  Each drafting request emits the targets up to its
        draft's first miss (speculative.accepted) and the target there; the others one token.
        Returns the columns each request filled (1 + its accepted drafts)."""
        eng = self.engine
        own = [b for b, d in enumerate(drafts) for _ in range(1 + len(d))]     # row -> request
        slots = [reqs[b].slot for b in own]
        first = [own.index(b) for b in range(len(reqs))]
        cols = [reqs[b].length + i - first[b] for i, b in enumerate(own)]
        toks = [t for r, d in zip(reqs, drafts) for t in [r.tokens[-1]] + d]
        view = self.cache.spread_view(slots, cols)
        step = Step(True, any(r.kind != BASE for r in reqs), any(r.kind == TOKEN for r in reqs))
        mix = None
        if step.mixed:
            idx = torch.tensor(slots, device=eng.device)
            active = None if step.token else tuple(sorted(set().union(*(r.active for r in reqs))))
            mix = Mix.for_rows(self.gates[idx], self.token_rows[idx], 1, eng.bank.token_router,
                               active, step.token)
        with eng.backend.policy.forward(eng.device, eng.backend.own_threads(len(own))):
            logits = eng.model(torch.tensor(toks, device=eng.device).view(-1, 1),
                               self.positions(view), view, view.mask(eng.config.sliding_window),
                               mix=mix, step=step)[:, -1]
        plain = [b for b, d in enumerate(drafts) if not d]
        if plain:
            self._sample([reqs[b] for b in plain], logits[[first[b] for b in plain]],
                         [reqs[b].slot for b in plain])
        with eng.backend.policy.forward(eng.device, True):      # torch at one thread (_sample)
            targets = logits.argmax(-1).tolist()                # one host sync
        filled = [1] * len(reqs)
        for b, d in enumerate(drafts):
            if not d:
                continue
            r, rows = reqs[b], slice(first[b], first[b] + 1 + len(d))
            if r.params.greedy:
                t = targets[rows]
                m = accepted(d, t)
                out = t[:m + 1]
            else:
                with eng.backend.policy.forward(eng.device, True):
                    m, nxt = sampled(r, d, logits[rows])
                out = d[:m] + [nxt]
            r.drafting.done(len(d), m)
            for tok in out:
                if not r.done:
                    r.emit(tok)
            self.last_tok[r.slot] = out[-1]
            filled[b] = m + 1
        self._add_row_gates(reqs, mix, own, first, filled)
        return filled

    def _add_row_gates(self, reqs, mix, own: list[int], first: list[int], filled: list[int]):
        """``_add_token_gates`` for a verify step: request b's rows first[b].. of which the first
        filled[b] count (the rejected drafts' do not)."""
        if mix is None:
            return
        valid = torch.tensor([i - first[b] < filled[b] for i, b in enumerate(own)],
                             device=self.gates.device).view(-1, 1)
        sums = mix.request_sums(len(own), 1, valid)
        if sums is None:
            return
        layers = self.engine.config.num_hidden_layers
        for b, r in enumerate(reqs):
            if r.kind == TOKEN:
                r.add_token_gates(sums[first[b]:first[b] + filled[b]].sum(0), layers * filled[b])

    def _decode(self, plan: Plan) -> torch.Tensor:
        """Logits [n, V] of a decode step: the static step where there is one, else dynamic."""
        n = len(plan.reqs)
        if self.static is not None:              # static shapes, captured in graphs on CUDA
            try:                                 # under run's thread policy
                logits, mix = self.static.forward(plan.reqs, plan.step)
            except CaptureFailed as e:
                warnings.warn(str(e), RuntimeWarning, stacklevel=3)
                self.static = None
            else:
                self._add_token_gates(plan.reqs, mix, 1, None, plan.counts)
                self.static.lengths[:n] += 1
                return logits[:n]
        return self._forward(plan)[0]

    def _forward(self, plan: Plan) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [n, V] of each row's last token (a prefill row's last real one): the model on
        the plan's slots through a RowsView, with their gate rows; token-routed gates are added
        up per request, on the device.  And the hidden states entering the blocks ``plan.keep``
        [n, T, len(keep), d] (None without)."""
        eng, reqs, s0, n = self.engine, plan.reqs, plan.s0, len(plan.reqs)
        dev = eng.device
        view = self.cache.rows_view(s0, plan.starts, plan.counts)
        pick = None
        if plan.decode:
            tokens = self.last_tok[s0:s0 + n].view(n, 1)
        else:
            tokens = torch.tensor([t + [0] * (view.T - len(t)) for t in plan.tokens], device=dev)
            pick = torch.tensor(plan.counts, device=dev) - 1
        step = plan.step
        mix = self._mix(reqs, s0, view.T, step)
        positions = self.positions(view)
        keep = {"keep": plan.keep} if plan.keep else {}
        with eng.backend.policy.forward(eng.device, eng.backend.own_threads(tokens.numel())):
            out = eng.model(tokens, positions, view, view.mask(eng.config.sliding_window),
                            mix=mix, pick=pick, step=step, **keep)
        logits, kept = out if keep else (out, None)
        self._add_token_gates(reqs, mix, view.T, view.valid, plan.counts)
        return logits[:, -1], kept

    def _mix(self, reqs: list, s0: int, T: int, step: Step) -> Mix | None:
        """The gates of slots s0.. for a forward of T tokens per row (None: no persona)."""
        if not step.mixed:
            return None
        active = None if step.token else tuple(sorted(set().union(*(r.active for r in reqs))))
        return Mix.for_rows(self.gates[s0:s0 + len(reqs)], self.token_rows[s0:s0 + len(reqs)], T,
                            self.engine.bank.token_router, active, step.token)

    def lower(self, r, c0: int, c1: int, keep: tuple[int, ...]) -> torch.Tensor:
        """The base model's blocks below keep[-1] for prompt columns c0:c1 of ``r``'s slot, their
        keys and values into the slot: the hidden states entering each block of ``keep``
        [c1 - c0, len(keep), d] (an "auto" request's first phase, routing.py)."""
        eng, s = self.engine, r.slot
        view = self.cache.rows_view(s, [c0], [c1 - c0])
        tokens = torch.tensor([r.ids[c0:c1]], device=eng.device)
        with eng.backend.policy.forward(eng.device, eng.backend.own_threads(c1 - c0)):
            return eng.model.lower(tokens, self.positions(view), view,
                                   view.mask(eng.config.sliding_window), keep)[0]

    def resume(self, r, c0: int, c1: int, h: torch.Tensor, start: int) -> None:
        """Blocks start.. for columns c0:c1 of ``r``'s slot from h [c1 - c0, d], the hidden
        states entering block ``start``: the persona's layers of a prefix-cache hit whose lower
        layers were shared (prefix_cache.py).  Their keys and values go into the slot; nothing
        is sampled."""
        eng, s = self.engine, r.slot
        view = self.cache.rows_view(s, [c0], [c1 - c0])
        step = Step(False, r.kind != BASE, r.kind == TOKEN)
        mix = self._mix([r], s, view.T, step)
        with eng.backend.policy.forward(eng.device, eng.backend.own_threads(c1 - c0)):
            eng.model.resume(h.unsqueeze(0), self.positions(view), view,
                             view.mask(eng.config.sliding_window), mix=mix, start=start, step=step)

    def positions(self, view) -> torch.Tensor:
        """The rotary positions [m, T] of a view's tokens, clamped to the model's context: a
        padding row (a static step's, or past a short row's chunk) may sit beyond it, and its
        outputs are never used."""
        return view.positions.clamp(max=self.engine.config.max_position_embeddings - 1)

    def _add_token_gates(self, reqs, mix, T: int, valid, counts: list[int]) -> None:
        """Hand each token-routed request its gates of this forward (summed over its valid
        tokens and the layers, on the device); rows past len(reqs) are padding."""
        sums = None if mix is None else mix.request_sums(len(reqs), T, valid)
        if sums is None:
            return
        layers = self.engine.config.num_hidden_layers
        for b, r in enumerate(reqs):
            if r.kind == TOKEN:
                r.add_token_gates(sums[b], layers * counts[b])

    # sampling -----------------------------------------------------------------------------------
    def _sample(self, reqs: list, logits: torch.Tensor, slots) -> None:
        """``_sample_rows`` with torch at one thread (backends/threads.py)."""
        if reqs:
            with self.engine.backend.policy.forward(self.engine.device, True):
                self._sample_rows(reqs, logits, slots)

    def _sample_rows(self, reqs: list, logits: torch.Tensor, slots) -> None:
        """Next tokens of ``reqs`` (slots ``slots``: the first of consecutive ones, or a list)
        from logits [n, V]: greedy rows by one argmax, the
        others by their own samplers, structured rows masked by their grammar first (and EOS
        masked in rows short of their min_tokens); one host
        sync for all of them (and one more for the logprobs of the rows whose request asks for
        them, scoring.logprobs_of).  Each token goes to its request (Request.emit)."""
        held = [b for b, r in enumerate(reqs) if r.grammar is not None]
        if held:                  # structured rows: only what their grammar allows (in place)
            mask_rows(logits, held, [reqs[b].grammar for b in held])
        for b, r in enumerate(reqs):
            if len(r.tokens) < r.params.min_tokens and r.eos_list:
                logits[b, r.eos_list] = float("-inf")        # no EOS before min_tokens
        toks = greedy(logits)
        for b, r in enumerate(reqs):
            if not r.simple:
                toks[b] = r.sampler(logits[b:b + 1], [0])[0]
        if isinstance(slots, int):
            self.last_tok[slots:slots + len(reqs)] = toks
        else:
            self.last_tok[slots] = toks
        lps = [None] * len(reqs)
        want = [b for b, r in enumerate(reqs) if r.params.logprobs is not None]
        if want:                  # one more transfer, only for the rows that asked
            top = max(reqs[b].params.logprobs for b in want)
            for b, lp in zip(want, logprobs_of(logits[want], toks[want], top)):
                lp.top = lp.top[:reqs[b].params.logprobs]
                lps[b] = lp
        for r, t, lp in zip(reqs, toks.tolist(), lps):
            if not r.done:
                r.emit(t, lp)
