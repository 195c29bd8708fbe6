"""Continuous batching: requests with different personas join and leave the running batch between
decode steps.

    req = eng.submit("Hello", max_new_tokens=32, persona={"extraversion+": 1.0})
    for token_id in req: ...          # as they are produced
    out = req.result()                # GenerationOutput (text, token_ids, finish_reason, gates)
    req.cancel()                      # finish_reason "cancelled"

Each ``step``: admit waiting requests while slots are free (their prompts are prefilled together,
right-padded, in chunks of ``prefill_chunk`` tokens, into their slots of the KV pool; each one's
first token is sampled from the prefill), then one decode step for every running request (B rows of one token each,
every row at its own position), then retire the finished and the cancelled.  The KV pool
(kv_cache.SlotCache) holds ``slots`` rows of ``max_len`` columns; running requests occupy slots
0..n-1, and the gate matrix [slots, K] on the model's device keeps one row per slot in the same
order: a request that leaves is replaced by the last one (one slot row and one gate row copied).

Personas per request, as ``generate`` takes them: None, explicit weights, "auto" (the sequence
router reads the prompt at admission) or "token" (the token router in every layer and step).
A background thread runs steps while requests are pending (``Engine.submit`` starts it); tests
and benchmarks can drive ``step()`` themselves with ``background=False``.

Not yet here (issue 10): the decode step still syncs with the host when it builds its Mix (the
active expert set), sampling runs per request, and nothing is captured in CUDA graphs.
"""
from __future__ import annotations

import collections
import threading
import time

import torch

from .engine import CpuThreads, GenerationOutput
from .errors import RequestError
from .kv_cache import SlotCache
from .mixing import Mix
from .model import attention_mask
from .persona import BASE, TOKEN, Personas
from .sampling import Sampler, SamplingParams
from .tokenizer import Detokenizer


class Request:
    """One submitted request: iterate it for its token ids, ``result()`` for the whole output."""

    def __init__(self, sched: "Scheduler", ids: list[int], params: SamplingParams, persona):
        eng = sched.engine
        self.sched, self.ids, self.params = sched, list(ids), params
        self.personas = Personas(eng.bank, [persona], 1)       # validates the spec now
        self.kind = self.personas.kinds[0]
        ctx = eng.config.max_position_embeddings
        self.budget = min(params.max_new_tokens, ctx - len(ids))
        self.sampler = Sampler(params, 1, eng.config.vocab_size, eng.device)
        self.sampler.observe(torch.tensor([0], device=eng.device), torch.tensor([ids], device=eng.device))
        self.detok = Detokenizer(eng.tokenizer, params.stop) if params.stop and eng.tokenizer else None
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.cancelled = False
        self.slot = -1
        self.length = 0                                   # cache columns filled
        self.t_submit, self.t_first, self.t_done = time.perf_counter(), None, None
        self._cond = threading.Condition(sched.lock)

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
            if self.error is not None:
                raise self.error
        return self.sched.engine._output(self.ids, self.tokens, self.finish_reason, self.params,
                                         self.personas.report(0))

    def cancel(self) -> None:
        """Stop the request: it leaves at the next step (finish_reason "cancelled")."""
        with self._cond:
            if not self.done:
                self.cancelled = True
                self.sched._wake.notify_all()

    # scheduler side ---------------------------------------------------------------------------
    def _emit(self, tok: int) -> None:
        """Record a sampled token and decide whether the request is finished."""
        self.tokens.append(tok)
        if self.t_first is None:
            self.t_first = time.perf_counter()
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
        self._cond.notify_all()

    def _finish(self, reason: str) -> None:
        self.finish_reason, self.t_done = reason, time.perf_counter()
        self._cond.notify_all()


class Scheduler:
    """The step loop over a pool of KV slots; see the module docstring.

    slots: requests decoded together at most; max_len: cache columns per slot (prompt + new
    tokens of one request; default the model's context, capped at 4096); prefill_chunk: prompt
    tokens per prefill forward (a long prompt does not stall the running requests for long).
    """

    def __init__(self, engine, slots: int = 8, max_len: int | None = None,
                 prefill_chunk: int = 256, background: bool = True):
        if not isinstance(slots, int) or slots < 1:
            raise RequestError(f"slots={slots!r}: expected an integer >= 1")
        cfg = engine.config
        self.engine, self.background = engine, background
        self.max_len = int(max_len or min(cfg.max_position_embeddings, 4096))
        if self.max_len < 2:
            raise RequestError(f"max_len={max_len!r}: expected an integer >= 2")
        self.prefill_chunk = max(1, int(prefill_chunk))
        m = engine.model
        self.cache = SlotCache(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, self.max_len,
                               cfg.head_dim, m.dtype, m.device)
        K = engine.bank.num_experts if engine.bank is not None else 0
        self.gates = torch.zeros(slots, K, dtype=torch.float32, device=engine.device)
        self.token_rows = torch.zeros(slots, dtype=torch.bool, device=engine.device)
        self.lengths = torch.zeros(slots, dtype=torch.long, device=engine.device)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []                   # running[i] owns slot i
        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)
        self._thread: threading.Thread | None = None
        self._threads = CpuThreads(engine.device)
        self.steps = 0

    @property
    def slots(self) -> int:
        return self.cache.slots

    # submission -----------------------------------------------------------------------------
    def submit(self, ids: list[int], params: SamplingParams, persona=None) -> Request:
        need = len(ids) + min(params.max_new_tokens,
                              self.engine.config.max_position_embeddings - len(ids))
        if need > self.max_len:
            raise RequestError(f"a request of {len(ids)} prompt tokens and up to "
                               f"{need - len(ids)} new ones needs {need} cache columns; a slot "
                               f"holds {self.max_len} (Scheduler max_len)")
        with self.lock:
            req = Request(self, ids, params, persona)
            self.waiting.append(req)
            self._wake.notify_all()
            if self.background and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._loop, name="pf-scheduler", daemon=True)
                self._thread.start()
        return req

    def pending(self) -> bool:
        return bool(self.waiting or self.running)

    def _pump_until(self, req: Request, cond, timeout: float | None = None) -> bool:
        """Wait (lock held) until cond(); without a background thread, run steps meanwhile."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while not cond():
            if not self.background:
                if not self.pending():
                    return cond()
                self.step()
                continue
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0:
                return False
            req._cond.wait(left)
        return True

    def _loop(self) -> None:
        """The background thread: steps while requests are pending (the lock is released between
        steps, so clients can submit and cancel); exits after 5 s with nothing to do."""
        while True:
            with self.lock:
                if not self.pending():
                    self._threads.restore()
                    self._wake.wait(timeout=5.0)
                    if not self.pending():
                        self._thread = None
                        return
            try:
                self.step()
            except BaseException as e:  # noqa: BLE001 - every waiting client gets the error
                with self.lock:
                    for r in list(self.waiting) + self.running:
                        r.error = e
                        r._cond.notify_all()
                    self.waiting.clear()
                    self.running.clear()
                    self._threads.restore()
                    self._thread = None
                return

    # the step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Retire the cancelled, admit, decode once, retire the finished."""
        with self.lock:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                r._finish("cancelled")
            self._retire()                   # cancelled since the last step: their slots are free
            admit = []
            while self.waiting and len(self.running) + len(admit) < self.slots:
                admit.append(self.waiting.popleft())
            if admit:
                self._admit(admit)
            self._retire()
            if self.running:
                self._decode()
                self._retire()
            self.steps += 1
            if not self.background:          # the caller's thread: leave its settings as found
                self._threads.restore()

    def _admit(self, reqs: list[Request]) -> None:
        """Prefill the prompts of ``reqs`` together into the next free slots (right-padded: row b
        fills columns 0..len_b-1; the padding's columns are overwritten by its decode steps before
        they are ever attended to) and sample each request's first token."""
        eng, s0, m = self.engine, len(self.running), len(reqs)
        dev = eng.device
        lens = torch.tensor([len(r.ids) for r in reqs], device=dev)
        P = int(lens.max())
        tokens = torch.zeros(m, P, dtype=torch.long, device=dev)
        for b, r in enumerate(reqs):
            tokens[b, :len(r.ids)] = torch.tensor(r.ids, device=dev)
            slot = s0 + b
            if r.personas.any:
                T = len(r.ids)
                mask = attention_mask(torch.zeros(1, dtype=torch.long, device=dev), 0, T,
                                      eng.config.sliding_window)
                r.personas.route(eng.model, tokens[b:b + 1, :T], torch.arange(T, device=dev).unsqueeze(0),
                                 mask, torch.ones(1, T, dtype=torch.bool))
                self.gates[slot] = r.personas.rows[0].to(dev)
                self.token_rows[slot] = r.kind == TOKEN
            else:
                self.gates[slot] = 0
                self.token_rows[slot] = False
            r.slot, r.length = slot, 0
            self.running.append(r)
        positions = torch.arange(P, device=dev).expand(m, P)
        view = self.cache.prefill_view(s0, m)
        self._threads.rows(m * P)
        first = [None] * m
        for c0 in range(0, P, self.prefill_chunk):
            c1 = min(P, c0 + self.prefill_chunk)
            mask = attention_mask(torch.zeros(m, dtype=torch.long, device=dev), c0, c1 - c0,
                                  eng.config.sliding_window)
            last = lens - 1 - c0                       # each row's last prompt token, in this chunk?
            valid = positions[:, c0:c1] < lens.view(-1, 1)
            logits = self._forward(reqs, tokens[:, c0:c1], positions[:, c0:c1], view, c0, mask,
                                   valid, pick=last.clamp(0, c1 - c0 - 1))[:, -1]
            for b in ((last >= 0) & (last < c1 - c0)).nonzero().flatten().tolist():
                first[b] = logits[b:b + 1]
        for b, r in enumerate(reqs):
            r.length = len(r.ids)
            r._emit(int(r.sampler(first[b], [0])[0]))

    def _decode(self) -> None:
        """One token for every running request, each at its own position."""
        n, dev = len(self.running), self.engine.device
        lengths = self.lengths[:n]
        lengths.copy_(torch.tensor([r.length for r in self.running], device=dev))
        tokens = torch.tensor([[r.tokens[-1]] for r in self.running], device=dev)
        view = self.cache.decode_view(lengths)
        j = torch.arange(view.end, device=dev).view(1, -1)
        seen = j <= lengths.view(-1, 1)
        w = self.engine.config.sliding_window
        if w is not None:
            seen &= (lengths.view(-1, 1) - j) < w
        self._threads.rows(n)
        logits = self._forward(self.running, tokens, lengths.view(-1, 1), view, 0,
                               seen.view(n, 1, 1, -1), torch.ones(n, 1, dtype=torch.bool))[:, -1]
        for b, r in enumerate(self.running):
            r.length += 1
            if not r.done:
                r._emit(int(r.sampler(logits[b:b + 1], [0])[0]))

    def _forward(self, reqs: list[Request], tokens, positions, cache, start, mask, valid,
                 pick=None):
        """The model on rows ``reqs`` (their slots' gates); valid [n, T] marks real tokens, whose
        token-routed gates are accumulated on each request for its report."""
        eng = self.engine
        mix = None
        if any(r.kind != BASE for r in reqs):
            s0, T = reqs[0].slot, tokens.shape[1]    # reqs hold consecutive slots (running or admitted)
            g, tok = self.gates[s0:s0 + len(reqs)], self.token_rows[s0:s0 + len(reqs)]
            if T > 1:
                g, tok = g.repeat_interleave(T, 0), tok.repeat_interleave(T, 0)
            mix = Mix(g, eng.backend, eng.bank.token_router, tok)
        logits = eng.model(tokens, positions, cache, start, mask, mix=mix, pick=pick)
        if mix is not None and mix.token_sum is not None:
            valid = valid.cpu()
            for b, r in enumerate(reqs):
                if r.kind == TOKEN:
                    r.personas.add_token_gates([0], mix.token_sum.view(len(reqs), -1,
                                                                       mix.token_sum.shape[-1])[b],
                                               valid[b:b + 1], eng.config.num_hidden_layers)
        return logits

    def _retire(self) -> None:
        """Drop finished and cancelled requests; the last running one takes each freed slot."""
        i = 0
        while i < len(self.running):
            r = self.running[i]
            if r.cancelled and not r.done:
                r._finish("cancelled")
            if not r.done:
                i += 1
                continue
            last = len(self.running) - 1
            if i != last:
                moved = self.running[last]
                self.cache.move(last, i)
                self.gates[i], self.token_rows[i] = self.gates[last], self.token_rows[last]
                moved.slot = i
                self.running[i] = moved
            self.running.pop()
            r.slot = -1
