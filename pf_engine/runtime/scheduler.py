"""Continuous batching: requests with different personas join and leave the running batch between
decode steps.

    req = eng.submit("Hello", max_new_tokens=32, persona={"extraversion+": 1.0})
    for token_id in req: ...          # as they are produced
    out = req.result()                # GenerationOutput (text, token_ids, finish_reason, gates)
    req.cancel()                      # finish_reason "cancelled"
    async for token_id in req: ...    # from asyncio (the server), and
    out = await req                   # without blocking the event loop

Each ``step``: admit waiting requests into free slots; prefill up to ``prefill_budget`` prompt
tokens of the requests being admitted (several prompts right-padded into one chunk, each row at
its own columns; a prompt longer than the budget takes several steps, so the running requests
are never stalled for more than one chunk); sample the first token of every prompt completed;
one decode step for every request past its prompt (one token per row, every row at its own
position); retire the finished and the cancelled.

Prompt KV is shared across requests through the engine's prefix cache (prefix_cache.py): at
admission, once the gates are known, the longest cached run of whole blocks of the prompt under
the request's persona root is copied into its slot and prefill starts after it; a prompt fully
prefilled stores its whole blocks.

The scheduler keeps requests, slots, admission, prefill budgets and retirement; every tensor
of a step is the step runner's (runner.py), which it hands a Plan per forward.  The KV pool
(kv_cache.SlotCache) holds ``slots`` rows of ``max_len`` columns.  Requests occupy slots
0..n-1, the decoding ones first, so each forward reads views of consecutive rows; the runner's
gate matrix [slots, K], token-routing flags and last tokens keep one row per slot in the same
order.  A request that leaves is replaced by the last one of its group (at most two slot rows
copied, only their used columns).

Host syncs per step: the sampled tokens (one ``tolist`` per forward that samples).  The active
expert set comes from host copies of the gate rows made at admission (one sync per sequence-
routed request), token-routed gates are summed on the device and read back when the request
ends.  On CUDA the decode step defaults to static shapes captured in CUDA graphs per batch and
length bucket (static_decode.py; ``decode="dynamic"`` turns it off).

Personas per request, as ``generate`` takes them: None, explicit weights, "auto" (the sequence
router reads the prompt's lower layers as its prefill computes them, routing.py, or at admission
by a pass of its own where the router reads an adapted layer) or "token" (the token router in
every layer and step).
A background thread runs steps while requests are pending (``Engine.submit`` starts it); tests
and benchmarks can drive ``step()`` themselves with ``background=False``.  The client's side,
``Request``, is in generation/request.py.
"""
from __future__ import annotations

import collections
import threading
import time

import torch

from pf_engine.errors import RequestError
from pf_engine.outputs import Stats
from pf_engine.persona.specs import SEQUENCE, TOKEN
from pf_engine.generation.request import Request
from pf_engine.runtime.config import SchedulerConfig
from pf_engine.runtime.prefix_cache import persona_root
from pf_engine.runtime.routing import TwoPhase
from pf_engine.runtime.runner import Plan, StepRunner
from pf_engine.runtime.speculative import drafts_for
from pf_engine.generation.sampling import SamplingParams


class Scheduler:
    """The step loop over a pool of KV slots; see the module docstring.  ``config``: a
    SchedulerConfig (runtime/config.py: slots, max_len, prefill_budget, background, kv_cache_gb,
    decode, prefix_cache), or None for the defaults."""

    def __init__(self, engine, config: SchedulerConfig | None = None):
        self.config = cfg = (config or SchedulerConfig()).resolved(engine)
        self.engine, self.background = engine, cfg.background
        self.max_len, self.prefill_budget = cfg.max_len, cfg.prefill_budget
        # prompt KV shared across requests (prefix_cache.py): the engine's, or one given, or None
        self.prefix = engine.prefix_cache() if cfg.prefix_cache == "engine" else cfg.prefix_cache
        self.runner = StepRunner(engine, cfg.slots, cfg.max_len, cfg.decode)   # a step's tensors
        self.two_phase = TwoPhase.of(engine, self.runner)    # "auto" from the prefill
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []                   # running[i] owns slot i
        self.decoding = 0                                  # running[:decoding] have their prompt in
        self.lock = threading.RLock()                      # held by a step, and by sync clients
        self._kick = threading.Event()                     # work arrived (submit, cancel, resume)
        self._thread_lock = threading.Lock()               # the background thread's start and exit
        self._thread: threading.Thread | None = None
        self.beat = time.monotonic()                       # the last step's end, or submission
        self.steps = 0
        self.stats = Stats()
        self.paused = False

    @property
    def slots(self) -> int:
        return self.runner.slots

    @property
    def static(self):
        """The runner's static-shape decode (static_decode.py), None when dynamic."""
        return self.runner.static

    # submission -----------------------------------------------------------------------------
    def submit(self, ids: list[int], params: SamplingParams, persona=None) -> Request:
        need = len(ids) + params.budget(len(ids), self.engine.config.max_position_embeddings)
        if need > self.max_len:
            raise RequestError(f"a request of {len(ids)} prompt tokens and up to "
                               f"{need - len(ids)} new ones needs {need} cache columns; a slot "
                               f"holds {self.max_len} (Scheduler max_len)")
        # No step lock here: a step holds it for a whole forward, and an event loop submitting
        # must not wait for that.  The deque append is atomic; the kick wakes an idle thread.
        req = Request(self, ids, params, persona)
        self.waiting.append(req)
        self.beat = time.monotonic()
        self.wake()
        if self.background:
            with self._thread_lock:          # against the thread deciding to exit (see _loop)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name="pf-scheduler",
                                                    daemon=True)
                    self._thread.start()
        return req

    def pause(self) -> None:
        """Stop stepping after the current step (submissions still queue); ``resume`` goes on.
        Only the background thread pauses."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.wake()

    def wake(self) -> None:
        """Work arrived (a submission, a cancellation, a resume): an idle thread goes on."""
        self._kick.set()

    def pending(self) -> bool:
        return bool(self.waiting or self.running)

    def wait(self, cond_var: threading.Condition, cond, timeout: float | None = None) -> bool:
        """Wait (the scheduler's lock held, through ``cond_var``, a Condition on it) until
        cond(); without a background thread, run steps meanwhile.  False on a timeout."""
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
            cond_var.wait(left)
        return True

    def _loop(self) -> None:
        """The background thread: steps while requests are pending and it is not paused (the
        lock is released between steps); exits after 5 s with nothing to do."""
        while True:
            if self.paused or not self.pending():
                self._kick.clear()
                if not self.paused and self.pending():
                    continue                              # arrived before the clear
                if not self._kick.wait(timeout=5.0) and not self.paused:
                    with self._thread_lock:
                        if not self.pending():
                            self._thread = None
                            return
                continue
            try:
                self.step()
            except BaseException as e:  # noqa: BLE001 - every waiting client gets the error
                with self.lock:
                    for r in list(self.waiting) + self.running:
                        r.fail(e)
                    self.waiting.clear()
                    self.running.clear()
                with self._thread_lock:
                    self._thread = None
                return

    # the step -------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Retire the cancelled, admit into free slots, prefill one budget of prompt tokens,
        decode once, retire the finished.  ``stats`` adds up the time and tokens of both."""
        with self.lock:
            for r in [r for r in list(self.waiting) if r.cancelled]:   # list(): clients append
                self.waiting.remove(r)
                r.finish("cancelled")
            self._retire()                   # cancelled since the last step: their slots are free
            st, t0 = self.stats, time.perf_counter()
            while self.waiting and len(self.running) < self.slots:
                self._admit(self.waiting.popleft())
            if len(self.running) > self.decoding:
                self._prefill()
                self._retire()
            t1 = time.perf_counter()
            if self.decoding:
                self._decode()
                self._retire()
            st.prefill_s, st.decode_s = (st.prefill_s + t1 - t0,
                                         st.decode_s + time.perf_counter() - t1)
            self.steps += 1
            self.beat = time.monotonic()

    def stalled(self, seconds: float) -> bool:
        """Requests are pending and no step has ended (nor a request arrived) for ``seconds``:
        a hung step, or a stopped thread (a replica's health check, serve/ray_serve.py)."""
        return (self.pending() and not self.paused
                and time.monotonic() - self.beat > seconds)

    def run(self) -> None:
        """Step until nothing is pending, in the caller's thread: what ``generate`` does with
        its private scheduler."""
        while self.pending():
            self.step()

    def _admit(self, r: Request) -> None:
        """Give ``r`` the next free slot and its gate row (the sequence router reads its prompt
        here, or from the prefill's lower layers: routing.py); its prompt is prefilled by the
        following steps."""
        slot, row = len(self.running), None
        if r.kind == SEQUENCE and self.two_phase is not None:
            r.slot, r.length = slot, 0
            self.runner.admit(slot, None, False, 0)
            self.running.append(r)
            self.two_phase.admit(r, self.prefix)
            return
        if r.personas.any:
            if r.kind == SEQUENCE:
                r.personas.route(self.engine.model,
                                 torch.tensor([r.ids], device=self.engine.device))
            row = r.personas.rows[0]                # host copy: the active set costs no sync later
            r.active = set(row.nonzero().flatten().tolist())
        r.slot, r.length = slot, 0
        self.runner.admit(slot, row, r.kind == TOKEN, 0)
        if self.prefix is not None:
            self._reuse_prefix(r)
            self.runner.admit(slot, row, r.kind == TOKEN, r.length)
        self.running.append(r)

    def _reuse_prefix(self, r: Request) -> None:
        """Copy the cached KV of ``r``'s longest cached prompt prefix into its slot (the shared
        lower layers and its persona's upper ones, gates known by now; prefix_cache.py), the
        persona layers of the blocks only the shared part held computed from their kept hidden
        states: its prefill starts after them."""
        p, cache = self.prefix, self.runner.cache
        r.prefix_root = root = persona_root(r)
        hit = p.lookup(root, r.ids, len(r.ids) - 1)
        B = p.block
        for i, blk in enumerate(hit.shared):
            cache.load(r.slot, i * B, blk.kv, p.lower)
        for i, blk in enumerate(hit.persona):
            cache.load(r.slot, i * B, blk.kv, p.upper)
        n, n_p = hit.tokens(B), len(hit.persona) * B
        if n > n_p:
            h = torch.cat([b.hidden[:, -1] for b in hit.shared[n_p // B:]])
            self.runner.resume(r, n_p, n, h, p.split)
        r.length = r.cached_tokens = n
        r.shared_cached_tokens = n - n_p if hit.shared else 0
        r.hidden = [] if p.split else None

    def _keep_prefix(self, r: Request) -> None:
        """``r``'s prompt is in its slot: store its whole blocks in the prefix cache (the shared
        part with the hidden states its prefill kept, from its first uncached token on)."""
        p, cache, s, off = self.prefix, self.runner.cache, r.slot, r.cached_tokens
        h = torch.cat(r.hidden) if r.hidden else None

        def shared(c0: int, c1: int):
            if h is None or c0 < off:       # cached before (and evicted since): the chain stops
                return None
            return cache.save(s, c0, c1, p.lower), h[c0 - off:c1 - off].clone()
        p.insert(r.prefix_root, r.ids, len(r.ids), shared,
                 lambda c0, c1: cache.save(s, c0, c1, p.upper))
        r.hidden = None

    def _prefill(self) -> None:
        """One forward over the next ``prefill_budget`` prompt tokens of the prefilling requests
        (slots decoding..n-1, in slot order, several requests right-padded into one chunk).  A
        request whose prompt is complete samples its first token and starts decoding; since the
        budget goes in slot order, those are always the first of the group."""
        left, reqs, counts = self.prefill_budget, [], []
        for r in self.running[self.decoding:]:
            if r.lower is not None:          # "auto" before its gates (routing.py): its turn
                if reqs:
                    break
                last, before = len(r.ids) - 1, min(r.lower.done, len(r.ids) - 1)
                left = self.two_phase.advance(r, left, self.prefix)
                done = r.lower.done if r.lower is not None else last
                self.stats.prefill_tokens += min(done, last) - before   # the last: below
                if r.lower is not None:
                    break
            take = min(len(r.ids) - r.length, left)
            if take <= 0:
                break
            reqs.append(r)
            counts.append(take)
            left -= take
        if not reqs:
            return
        done = sum(r.length + c == len(r.ids) for r, c in zip(reqs, counts))
        keep = self.prefix.keep if self.prefix is not None else ()
        kept = self.runner.run(Plan(reqs, [r.length for r in reqs], counts,
                                    [r.ids[r.length:r.length + c] for r, c in zip(reqs, counts)],
                                    done, keep))
        self.stats.prefill_tokens += sum(counts)
        for b, (r, c) in enumerate(zip(reqs, counts)):
            if kept is not None and r.hidden is not None:
                r.hidden.append(kept[b, :c])
            r.length += c
            if self.prefix is not None and r.length == len(r.ids):
                self._keep_prefix(r)
        self.decoding += done

    def _decode(self) -> None:
        """One token for every decoding request (slots 0..decoding-1), each at its own column;
        where some draft (speculative.py), one forward verifying their drafts instead."""
        reqs = self.running[:self.decoding]
        drafts = drafts_for(reqs) if self.runner.speculates else []
        if any(drafts):
            filled = self.runner.verify(reqs, drafts)
            st = self.stats
            st.draft_tokens += sum(len(d) for d in drafts)
            st.accepted_tokens += sum(f - 1 for f in filled)
        else:
            self.runner.run(Plan.decode_of(reqs))
            filled = [1] * len(reqs)
        for r, f in zip(reqs, filled):
            r.length += f
        self.stats.decode_tokens += sum(filled)

    def _retire(self) -> None:
        """Drop finished and cancelled requests; the slots stay consecutive (see ``_vacate``)."""
        i = 0
        while i < len(self.running):
            r = self.running[i]
            if r.cancelled and not r.done:
                r.finish("cancelled")
            if r.done:
                self._vacate(i)
                r.slot = -1
            else:
                i += 1

    def _vacate(self, i: int) -> None:
        """Free slot i.  Decoding requests hold slots 0..d-1, prefilling ones d..n-1: a decoding
        slot is refilled by the last decoding request and that one's by the last prefilling one;
        a prefilling slot by the last prefilling one.  At most two slot rows are copied."""
        d, last = self.decoding, len(self.running) - 1
        if i < d:
            if i != d - 1:
                self._move(d - 1, i)
            if last != d - 1:
                self._move(last, d - 1)
            self.decoding -= 1
        elif i != last:
            self._move(last, i)
        self.running.pop()

    def _move(self, src: int, dst: int) -> None:
        r = self.running[src]
        self.runner.move(src, dst, r.length if r.lower is None else r.lower.done)
        r.slot, self.running[dst] = dst, r
