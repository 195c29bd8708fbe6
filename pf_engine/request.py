"""A request submitted to the continuous batch (scheduler.py): the client's handle.

    for token_id in req: ...          # blocking, as they are produced
    async for token_id in req: ...    # from asyncio, without blocking the event loop
    out = req.result() / await req    # GenerationOutput
    req.cancel()                      # it leaves at the next step, finish_reason "cancelled"

Everything here runs under the scheduler's lock; the scheduler calls ``_emit`` and ``_finish``.
"""
from __future__ import annotations

import asyncio
import threading
import time

import torch

from pf_engine.errors import RequestError
from pf_engine.outputs import GenerationOutput
from pf_engine.persona.specs import Personas
from pf_engine.sampling import Sampler, SamplingParams
from pf_engine.tokenizer import Detokenizer


class Request:
    """One submitted request: iterate it for its token ids, ``result()`` for the whole output."""

    def __init__(self, sched, ids: list[int], params: SamplingParams, persona):
        eng = sched.engine
        self.sched, self.ids, self.params = sched, list(ids), params
        self.personas = Personas(eng.bank, [persona], 1)       # validates the spec now
        self.kind = self.personas.kinds[0]
        ctx = eng.config.max_position_embeddings
        self.budget = min(params.max_new_tokens, ctx - len(ids))
        self.sampler = Sampler(params, 1, eng.config.vocab_size, eng.device)
        self.sampler.observe(torch.tensor([0], device=eng.device), torch.tensor([ids], device=eng.device))
        self.detok = Detokenizer(eng.tokenizer, params.stop) if params.stop and eng.tokenizer else None
        self.simple = params.greedy and params.repetition_penalty == 1.0   # one batched argmax
        self.active: set[int] = set()                     # expert ids with a nonzero gate
        self.token_sum, self.token_count = None, 0        # token routing: gates summed on device
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.slot = -1
        self.length = 0                                   # cache columns filled
        self.t_submit, self.t_first, self.t_done = time.perf_counter(), None, None
        self._cond = threading.Condition(sched.lock)
        self._watchers: list = []                         # (event loop, asyncio.Event) of awaiters

    # client side ------------------------------------------------------------------------------
    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def __iter__(self):
        i = 0
        while True:
            with self._cond:
                self.sched._pump_until(self, lambda: len(self.tokens) > i or self.done)
                if self.error is not None:
                    raise self.error
                if len(self.tokens) > i:
                    tok, i = self.tokens[i], i + 1
                else:
                    return
            yield tok

    def result(self, timeout: float | None = None) -> GenerationOutput:
        with self._cond:
            if not self.sched._pump_until(self, lambda: self.done, timeout):
                raise TimeoutError(f"request not finished after {timeout} s")
        return self._output()

    def _output(self) -> GenerationOutput:
        if self.error is not None:
            raise self.error
        return self.sched.engine._output(self.ids, self.tokens, self.finish_reason, self.params,
                                         self.personas.report(0))

    # asyncio clients (the server): the scheduler thread wakes them through their event loop -----
    def __aiter__(self):
        return self._atokens()

    def __await__(self):
        return self._aresult().__await__()

    async def _atokens(self):
        """``async for tok in req``: its token ids as they are produced."""
        i = 0
        async for tok in self._await(lambda: len(self.tokens) > i, lambda: self.tokens[i]):
            i += 1
            yield tok

    async def _aresult(self) -> GenerationOutput:
        """``await req``: its GenerationOutput once it is done."""
        async for _ in self._await(lambda: False, None):
            pass
        return self._output()

    async def _await(self, ready, take):
        """Yields take() whenever ready(), until the request is done; raises its error.

        Lock-free: a step holds the scheduler's lock for a whole forward, and an event loop must
        not wait for that.  The scheduler thread appends a token (or sets the finish reason or
        error) before it schedules ``ev.set`` on this loop, and this loop clears ``ev`` before it
        looks, so no wake-up is lost."""
        if not self.sched.background:
            raise RequestError("await / async for need a background scheduler "
                               "(Engine.scheduler(background=True), the default)")
        ev = asyncio.Event()
        self._watchers = self._watchers + [(asyncio.get_running_loop(), ev)]
        try:
            while True:
                ev.clear()
                if self.error is not None:
                    raise self.error
                done = self.done                   # read before the tokens: none comes after
                if ready():
                    yield take()
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
            self.sched._kick.set()

    # scheduler side ---------------------------------------------------------------------------
    def _emit(self, tok: int) -> None:
        """Record a sampled token and decide whether the request is finished."""
        self.tokens.append(tok)
        if self.t_first is None:
            self.t_first = time.perf_counter()
        if self.params.repetition_penalty != 1.0:
            self.sampler.observe(torch.tensor([0], device=self.sched.engine.device),
                                 torch.tensor([[tok]], device=self.sched.engine.device))
        reason = None
        if tok in self.sched.engine.eos_ids:
            reason = "stop"
        elif self.detok is not None:
            self.detok.add(tok)
            reason = "stop" if self.detok.stopped else None
        if reason is None and len(self.tokens) >= self.budget:
            reason = "length"
        if reason is not None:
            self._finish(reason)
        self._notify()

    def _finish(self, reason: str) -> None:
        if self.token_sum is not None:                    # the report reads the host copies
            self.personas.token_sum[0] = self.token_sum.float().cpu()
            self.personas.token_count[0] = float(self.token_count)
        self.finish_reason, self.t_done = reason, time.perf_counter()
        self._notify()
