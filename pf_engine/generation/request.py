"""A request submitted to the continuous batch (runtime/scheduler.py): the client's handle.

    for token_id in req: ...          # blocking, as they are produced
    for piece in req.text(): ...      # the text as it grows (stop strings cut, EOS dropped)
    async for token_id in req: ...    # from asyncio, without blocking the event loop
    async for piece in req.atext(): ...
    out = req.result() / await req    # GenerationOutput
    req.cancel()                      # it leaves at the next step, finish_reason "cancelled"

The scheduler side (``emit``, ``finish``, ``fail``, ``add_token_gates``) runs in the step, under
the scheduler's lock.  Each sampled token goes through the request's one Detokenizer there, which
decides a stop string and records the text piece it releases; the final text is that
Detokenizer's, so streamed pieces always add up to ``result().text``.
"""
from __future__ import annotations

import asyncio
import threading
import time

import torch

from pf_engine.errors import RequestError
from pf_engine.outputs import GenerationOutput
from pf_engine.persona.specs import BASE, TOKEN, Personas
from pf_engine.generation.sampling import Sampler, SamplingParams
from pf_engine.generation.structured import Grammars
from pf_engine.tokenizer import Detokenizer


class Request:
    """One submitted request: iterate it for its token ids, ``result()`` for the whole output."""

    def __init__(self, sched, ids: list[int], params: SamplingParams, persona):
        eng = sched.engine
        self.sched, self.ids, self.params = sched, list(ids), params
        # a spec is checked now; a one-row Personas comes checked (Engine, the server's protocol)
        self.personas = (persona if isinstance(persona, Personas)
                         else Personas(eng.bank, [persona], 1))
        if len(self.personas.kinds) != 1:
            raise ValueError(f"a request takes one persona row; got {len(self.personas.kinds)}")
        self.kind = self.personas.kinds[0]
        self.budget = params.budget(len(ids), eng.config.max_position_embeddings)
        self.eos_ids = eng.eos_ids
        self.sampler = Sampler(params, 1, eng.config.vocab_size, eng.device)
        self.sampler.observe(torch.tensor([0], device=eng.device),
                             torch.tensor([ids], device=eng.device))
        self.detok = Detokenizer(eng.tokenizer, params.stop) if eng.tokenizer is not None else None
        self.simple = params.greedy and params.repetition_penalty == 1.0   # one batched argmax
        self.eos_list = sorted(self.eos_ids)              # masked before min_tokens (runner)
        self.grammar = None                               # structured.Matcher: masks its logits
        if params.response_format is not None:
            self.grammar = Grammars.of(eng).compile(params.response_format).matcher()
        self.active: set[int] = set()                     # expert ids with a nonzero gate
        self.drafting = None                              # speculative decoding's state
                                                          # (runtime/speculative.Drafting)
        self.token_sum, self.token_count = None, 0        # token routing: gates summed on device
        self.tokens: list[int] = []
        self.logprobs: list = []                          # Logprob per token, if params ask
        self.pieces: list[str] = []                       # text released so far, in pieces
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.slot = -1
        self.length = 0                                   # cache columns filled
        self.cached_tokens = 0                            # of them, copied from the prefix cache
        self.shared_cached_tokens = 0                     # of them, the shared layers only
        self.prefix_root = None                           # its prefix-cache root
        self.hidden = None                                # its prefill's kept hidden states
                                                          # (runtime/prefix_cache.py)
        self.lower = None                                 # "auto" before its gates are known
                                                          # (runtime/routing.py)
        self.t_submit, self.t_first, self.t_done = time.perf_counter(), None, None
        self._cond = threading.Condition(sched.lock)
        self._watchers: list = []                         # (event loop, asyncio.Event) of awaiters

    # client side ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def __iter__(self):
        """Its token ids as they are produced (blocking; steps the scheduler without a thread)."""
        return self._follow(self.tokens)

    def text(self):
        """Its text in pieces as they are released (blocking)."""
        return self._follow(self.pieces)

    def _follow(self, items: list):
        i = 0
        while True:
            with self._cond:
                self.sched.wait(self._cond, lambda: len(items) > i or self.done)
                if self.error is not None:
                    raise self.error
                if len(items) <= i:
                    return
                item, i = items[i], i + 1
            yield item

    def result(self, timeout: float | None = None) -> GenerationOutput:
        with self._cond:
            if not self.sched.wait(self._cond, lambda: self.done, timeout):
                raise TimeoutError(f"request not finished after {timeout} s")
        return self.output()

    def gate_row(self):
        """The gates it ran with, [K] float32 on the CPU: its row (explicit, or the sequence
        router's), for token routing the mean over its tokens and layers; None for the base
        model (or token routing before its first step)."""
        if self.kind == TOKEN:
            if self.token_sum is None:
                return None
            return self.token_sum.float().cpu() / max(1, self.token_count)
        rows = self.personas.rows
        return None if rows is None or self.kind == BASE else rows[0].float().cpu()

    def output(self) -> GenerationOutput:
        """The GenerationOutput of a finished request (its error, if it failed)."""
        if self.error is not None:
            raise self.error
        token_mean = None
        if self.token_sum is not None:
            token_mean = self.token_sum.float().cpu() / max(1, self.token_count)
        return GenerationOutput(text="".join(self.pieces), token_ids=list(self.tokens),
                                finish_reason=self.finish_reason,
                                gates=self.personas.report(0, token_mean),
                                logprobs=list(self.logprobs)
                                if self.params.logprobs is not None else None,
                                usage={"prompt_tokens": len(self.ids),
                                       "completion_tokens": len(self.tokens)},
                                cached_tokens=self.cached_tokens,
                                shared_cached_tokens=self.shared_cached_tokens)

    # asyncio clients (the server): the scheduler thread wakes them through their event loop -----
    def __aiter__(self):
        return self._afollow(self.tokens)

    def atext(self):
        """``async for piece in req.atext()``: its text in pieces as they are released."""
        return self._afollow(self.pieces)

    def __await__(self):
        return self.aresult().__await__()

    async def aresult(self) -> GenerationOutput:
        """``await req``: its GenerationOutput once it is done."""
        async for _ in self._afollow([]):
            pass
        return self.output()

    async def _afollow(self, items: list):
        """Yields items[i] as they appear, until the request is done; raises its error.

        Lock-free: a step holds the scheduler's lock for a whole forward, and an event loop must
        not wait for that.  The scheduler thread appends (or sets the finish reason or error)
        before it schedules ``ev.set`` on this loop, and this loop clears ``ev`` before it
        looks, so no wake-up is lost."""
        if not self.sched.background:
            raise RequestError("await / async for need a background scheduler "
                               "(Engine.new_scheduler(background=True), the default)")
        ev = asyncio.Event()
        self._watchers = self._watchers + [(asyncio.get_running_loop(), ev)]
        i = 0
        try:
            while True:
                ev.clear()
                if self.error is not None:
                    raise self.error
                done = self.done                   # read before the items: none comes after
                if len(items) > i:
                    i += 1
                    yield items[i - 1]
                elif done:
                    return
                else:
                    await ev.wait()
        finally:
            self._watchers = [w for w in self._watchers if w[1] is not ev]

    def _notify(self) -> None:
        """Wake the waiting clients: threads (lock held) and event loops."""
        self._cond.notify_all()
        for loop, ev in self._watchers:            # a snapshot: clients rebind, never mutate
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:               # that client's loop has closed: nobody to wake
                pass

    def cancel(self) -> None:
        """Stop the request: it leaves at the next step (finish_reason "cancelled").  Needs no
        lock: the step reads the flag at its start."""
        if not self.done:
            self.cancelled = True
            self.sched.wake()

    # scheduler side ---------------------------------------------------------------------------
    def emit(self, tok: int, logprob=None) -> None:
        """Record a sampled token (and its outputs.Logprob) and decide whether the request is
        finished."""
        self.tokens.append(tok)
        if logprob is not None:
            self.logprobs.append(logprob)
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if self.params.repetition_penalty != 1.0:
            self.sampler.observe(torch.tensor([0], device=self.sched.engine.device),
                                 torch.tensor([[tok]], device=self.sched.engine.device))
        reason = None
        if self.grammar is not None and tok not in self.eos_ids:
            self.grammar.consume(tok)             # the mask allowed it, so the grammar goes on
        if tok in self.eos_ids and not self.params.ignore_eos:
            reason = "stop"
        elif self.detok is not None:
            piece = self.detok.add(tok)
            if piece:
                self.pieces.append(piece)
            reason = "stop" if self.detok.stopped else None
        if reason is None and self.grammar is not None and self.grammar.done:
            reason = "stop"                       # the reply is complete: only EOS could follow
        if reason is None and len(self.tokens) >= self.budget:
            reason = "length"
        if reason is not None:
            self.finish(reason)
        self._notify()

    def finish(self, reason: str) -> None:
        """End the request with ``reason`` (its held-back text is released)."""
        if self.detok is not None:
            tail = self.detok.flush()
            if tail:
                self.pieces.append(tail)
        self.finish_reason, self.t_done = reason, time.perf_counter()
        self._notify()

    def fail(self, error: BaseException) -> None:
        """End the request with ``error`` (raised to every client)."""
        self.error = error
        self._notify()

    def add_token_gates(self, gate_sum: torch.Tensor, count: int) -> None:
        """Add the token-routed gates of one forward: their sum [K] over ``count`` (token, layer)
        pairs, kept on the device until the request reports them."""
        self.token_sum = gate_sum if self.token_sum is None else self.token_sum + gate_sum
        self.token_count += count
