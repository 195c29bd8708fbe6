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

The KV pool (kv_cache.SlotCache) holds ``slots`` rows of ``max_len`` columns.  Requests occupy
slots 0..n-1, the decoding ones first, so each forward reads views of consecutive rows; the
device-side gate matrix [slots, K], token-routing flags and last tokens keep one row per slot in
the same order.  A request that leaves is replaced by the last one of its group (at most two
slot rows copied, only their used columns).

Host syncs per step: the sampled tokens (one ``tolist`` per forward that samples).  The active
expert set comes from host copies of the gate rows made at admission (one sync per sequence-
routed request), token-routed gates are summed on the device and read back when the request
ends.  On CUDA the decode step defaults to static shapes captured in CUDA graphs per batch and
length bucket (static_decode.py; ``decode="dynamic"`` turns it off).

Personas per request, as ``generate`` takes them: None, explicit weights, "auto" (the sequence
router reads the prompt at admission) or "token" (the token router in every layer and step).
A background thread runs steps while requests are pending (``Engine.submit`` starts it); tests
and benchmarks can drive ``step()`` themselves with ``background=False``.  The client's side,
``Request``, is in request.py.
"""
from __future__ import annotations

import collections
import threading
import time
import warnings

import torch

from pf_engine.errors import RequestError
from pf_engine.outputs import Stats
from pf_engine.persona.mix import Mix
from pf_engine.persona.specs import BASE, SEQUENCE, TOKEN
from pf_engine.request import Request
from pf_engine.runtime.kv_cache import slots_for
from pf_engine.runtime.prefix_cache import persona_root
from pf_engine.runtime.static_decode import CaptureFailed, StaticDecode
from pf_engine.runtime.threads import POLICY
from pf_engine.sampling import SamplingParams
from pf_engine.scoring import logprobs_of
from pf_engine.structured import mask_rows


class Scheduler:
    """The step loop over a pool of KV slots; see the module docstring.

    slots: requests in flight at most (default 8, or as many as kv_cache_gb GiB of KV cache
    hold); max_len: cache columns per slot (prompt + new tokens of one request; default the
    model's context, capped at 4096); decode: "dynamic" (shapes fit each batch; the default on
    CPU), "static" or "graphs" (static_decode.py; graphs is the default on CUDA); prefill_budget: prompt tokens
    prefilled per step, over all requests being prefilled (a long prompt or a burst of arrivals
    delays the running requests' next token by one chunk of this size at most); prefix_cache:
    "engine" (the engine's, Engine.prefix_cache), a PrefixCache, or None (off).
    """

    def __init__(self, engine, slots: int | None = 8, max_len: int | None = None,
                 prefill_budget: int = 128, background: bool = True,
                 kv_cache_gb: float | None = None, decode: str | None = None, prefix_cache="engine"):
        cfg = engine.config
        self.engine, self.background = engine, background
        # prompt KV shared across requests (prefix_cache.py): the engine's, or one given, or None
        self.prefix = engine.prefix_cache() if prefix_cache == "engine" else prefix_cache
        self.max_len = int(max_len or min(cfg.max_position_embeddings, 4096))
        if self.max_len < 2:
            raise RequestError(f"max_len={max_len!r}: expected an integer >= 2")
        slots = slots_for(engine, self.max_len, slots, kv_cache_gb)
        if not isinstance(prefill_budget, int) or isinstance(prefill_budget, bool) or prefill_budget < 1:
            raise RequestError(f"prefill_budget={prefill_budget!r}: expected an integer >= 1")
        self.prefill_budget = prefill_budget
        m = engine.model
        self.cache = m.slot_cache(slots, self.max_len)     # this rank's heads (tensor parallel)
        K = engine.bank.num_experts if engine.bank is not None else 0
        dev = engine.device
        self.gates = torch.zeros(slots, K, dtype=torch.float32, device=dev)      # a row per slot
        self.token_rows = torch.zeros(slots, dtype=torch.bool, device=dev)
        self.last_tok = torch.zeros(slots, dtype=torch.long, device=dev)       # each slot's last token
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []                   # running[i] owns slot i
        self.decoding = 0                                  # running[:decoding] have their prompt in
        self.lock = threading.RLock()                      # held by a step, and by sync clients
        self._kick = threading.Event()                     # work arrived (submit, cancel, resume)
        self._thread_lock = threading.Lock()               # the background thread's start and exit
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.stats = Stats()
        self.paused = False
        decode = decode or ("graphs" if dev.type == "cuda" and engine.tensor_parallel == 1 else "dynamic")
        if decode not in ("dynamic", "static", "graphs"):
            raise RequestError(f"decode={decode!r}: expected dynamic, static or graphs")
        self.static = None if decode == "dynamic" else StaticDecode(self, decode == "graphs")

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
        # No step lock here: a step holds it for a whole forward, and an event loop submitting
        # must not wait for that.  The deque append is atomic; the kick wakes an idle thread.
        req = Request(self, ids, params, persona)
        self.waiting.append(req)
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
            st.prefill_s, st.decode_s = st.prefill_s + t1 - t0, st.decode_s + time.perf_counter() - t1
            self.steps += 1

    def run(self) -> None:
        """Step until nothing is pending, in the caller's thread: what ``generate`` does with
        its private scheduler."""
        while self.pending():
            self.step()

    def _admit(self, r: Request) -> None:
        """Give ``r`` the next free slot and its gate row (the sequence router reads its prompt
        here); its prompt is prefilled by the following steps."""
        slot, dev = len(self.running), self.engine.device
        if r.personas.any:
            if r.kind == SEQUENCE:
                r.personas.route(self.engine.model, torch.tensor([r.ids], device=dev))
            row = r.personas.rows[0]                # host copy: the active set costs no sync later
            r.active = set(row.nonzero().flatten().tolist())
            self.gates[slot] = row.to(dev)
            self.token_rows[slot] = r.kind == TOKEN
        else:
            self.gates[slot] = 0
            self.token_rows[slot] = False
        r.slot, r.length = slot, 0
        if self.prefix is not None:
            self._reuse_prefix(r)
        if self.static is not None:
            self.static.lengths[slot] = r.length
        self.running.append(r)

    def _reuse_prefix(self, r: Request) -> None:
        """Copy the cached KV of ``r``'s longest cached prompt prefix (under its persona's root,
        gates known by now) into its slot: its prefill starts after it."""
        r.prefix_root = root = persona_root(r)
        hit = self.prefix.lookup(root, r.ids, len(r.ids) - 1)
        B = self.prefix.block
        for i, blk in enumerate(hit):
            self.cache.load(r.slot, i * B, blk.kv)
        r.length = r.cached_tokens = len(hit) * B

    def _keep_prefix(self, r: Request) -> None:
        """``r``'s prompt is in its slot: store its whole blocks in the prefix cache."""
        cache, s = self.cache, r.slot
        self.prefix.insert(r.prefix_root, r.ids, len(r.ids), lambda c0, c1: cache.save(s, c0, c1))

    def _prefill(self) -> None:
        """One forward over the next ``prefill_budget`` prompt tokens of the prefilling requests
        (slots decoding..n-1, in slot order, several requests right-padded into one chunk).  A
        request whose prompt is complete samples its first token and starts decoding; since the
        budget goes in slot order, those are always the first of the group."""
        d, left, reqs, counts = self.decoding, self.prefill_budget, [], []
        for r in self.running[d:]:
            take = min(len(r.ids) - r.length, left)
            if take <= 0:
                break
            reqs.append(r)
            counts.append(take)
            left -= take
        view = self.cache.rows_view(d, [r.length for r in reqs], counts)
        rows = [r.ids[r.length:r.length + c] + [0] * (view.T - c) for r, c in zip(reqs, counts)]
        dev = self.engine.device
        logits = self._forward(reqs, torch.tensor(rows, device=dev), view,
                               pick=torch.tensor(counts, device=dev) - 1)[:, -1]
        self.stats.prefill_tokens += sum(counts)
        done = 0
        for r, c in zip(reqs, counts):
            r.length += c
            done += r.length == len(r.ids)
            if self.prefix is not None and r.length == len(r.ids):
                self._keep_prefix(r)
            if self.static is not None:
                self.static.lengths[r.slot] = r.length
        if done:
            self.decoding += done
            self._sample(reqs[:done], logits[:done], d)

    def _decode(self) -> None:
        """One token for every decoding request (slots 0..decoding-1), each at its own column;
        the forward and the sampling under one thread policy (threads.py): torch's argmax over
        the vocabulary would otherwise wake its OpenMP workers, whose spinning afterwards takes
        the cores from the next step's kernels."""
        with POLICY.forward(self.engine.device, self.engine.backend.own_threads(self.decoding)):
            self._decode_rows()

    def _decode_rows(self) -> None:
        reqs = self.running[:self.decoding]
        n = len(reqs)
        logits = None
        if self.static is not None:              # static shapes, captured in graphs on CUDA
            mixed = any(r.kind != BASE for r in reqs)
            any_token = any(r.kind == TOKEN for r in reqs)
            try:                                   # under _decode's thread policy
                logits, mix = self.static.forward(reqs, mixed, any_token)
            except CaptureFailed as e:
                warnings.warn(str(e), RuntimeWarning, stacklevel=2)
                self.static = None
            else:
                logits = logits[:n]
                self._add_token_gates(reqs, mix, 1, None, [1] * n)
                self.static.lengths[:n] += 1
        if logits is None:
            view = self.cache.rows_view(0, [r.length for r in reqs], [1] * n)
            logits = self._forward(reqs, self.last_tok[:n].view(n, 1), view)[:, -1]
        for r in reqs:
            r.length += 1
        self.stats.decode_tokens += n
        self._sample(reqs, logits, 0)

    def _sample(self, reqs: list[Request], logits: torch.Tensor, s0: int) -> None:
        """Next tokens of ``reqs`` (slots s0..) from logits [n, V]: greedy rows by one argmax, the
        others by their own samplers; one host sync for all of them (and one more for the
        logprobs of the rows whose request asks for them, scoring.logprobs_of).  Torch at one
        thread (threads.py; already so inside ``_decode``)."""
        with POLICY.forward(self.engine.device, True):
            self._sample_rows(reqs, logits, s0)

    def _sample_rows(self, reqs: list[Request], logits: torch.Tensor, s0: int) -> None:
        held = [b for b, r in enumerate(reqs) if r.grammar is not None]
        if held:                  # structured rows: only what their grammar allows (in place)
            mask_rows(logits, held, [reqs[b].grammar for b in held])
        toks = logits.argmax(-1)
        for b, r in enumerate(reqs):
            if not r.simple:
                toks[b] = r.sampler(logits[b:b + 1], [0])[0]
        self.last_tok[s0:s0 + len(reqs)] = toks
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

    def _forward(self, reqs: list[Request], tokens, view, pick=None):
        """The model on the consecutive slots of ``reqs`` (their gate rows) through ``view``
        (kv_cache.RowsView); token-routed gates are added up per request, on the device."""
        eng = self.engine
        mix = None
        if any(r.kind != BASE for r in reqs):
            any_token = any(r.kind == TOKEN for r in reqs)
            active = None if any_token else tuple(sorted(set().union(*(r.active for r in reqs))))
            s0, n = reqs[0].slot, len(reqs)
            mix = Mix.for_rows(self.gates[s0:s0 + n], self.token_rows[s0:s0 + n], tokens.shape[1],
                               eng.bank.token_router, active, any_token)
        positions = view.positions.clamp(max=eng.config.max_position_embeddings - 1)
        with POLICY.forward(eng.device, eng.backend.own_threads(tokens.numel())):
            logits = eng.model(tokens, positions, view, view.mask(eng.config.sliding_window),
                               mix=mix, pick=pick)
        self._add_token_gates(reqs, mix, tokens.shape[1], view.valid, view.counts)
        return logits

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
        self.cache.move(src, dst, r.length)
        self.gates[dst], self.token_rows[dst] = self.gates[src], self.token_rows[src]
        self.last_tok[dst] = self.last_tok[src]
        if self.static is not None:
            self.static.lengths[dst] = self.static.lengths[src]
        r.slot, self.running[dst] = dst, r
