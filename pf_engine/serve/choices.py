"""One API call's work on the engine: its choices as scheduler requests, prompt scoring for
echo, best-of ranking, and the bodies (shapes.py) they become.

    call = Call(engine, parsed)          # protocol.Parsed
    await call.prepare()                 # echo with logprobs: one scoring forward, no KV slot
    call.submit()                        # best_of requests per prompt (none for max_tokens 0)
    outs = await call.results()          # per prompt, its candidates' GenerationOutputs
    body = call.body(rid, outs)          # or: async for event in call.events(rid, deadline)

Choice index ``j * n + c`` is choice c of prompt j.  Candidate i of every prompt is sampled with
seed + i (when a seed is given), so ``n`` choices with seed s are what ``Engine.generate`` gives
with seeds s .. s + n - 1; greedy ones are equal.  With best_of > n the n candidates of highest
mean logprob per token are returned, in that order (OpenAI's rule).
"""
from __future__ import annotations

import asyncio
import time

from pf_engine.errors import RequestError
from pf_engine.generation.scoring import score_rows
from pf_engine.serve.protocol import APIError
from pf_engine.serve.shapes import (chat_logprobs, choice_body, chunk, completion_logprobs,
                                    merge_completion_logprobs, response)


class Call:
    def __init__(self, engine, p):
        self.engine, self.p, self.tok = engine, p, engine.tokenizer
        self.personas = p.personas.select([0] * len(p.prompts))    # checked by the protocol
        self.scores = None                     # per prompt [None, Logprob, ...] (echo + logprobs)
        self.reqs: list[list] = []             # per prompt, its best_of scheduler requests
        self.closed = False                    # it ended before its requests were submitted

    @property
    def all_reqs(self) -> list:
        return [r for rs in self.reqs for r in rs]

    @property
    def finished(self) -> bool:
        """Nothing of it runs or will: it ended before submitting, or all its requests are
        done (finished, cancelled or failed)."""
        return self.closed or (bool(self.reqs) and all(r.done for r in self.all_reqs))

    @property
    def slots_needed(self) -> int:
        return 0 if self.p.score_only else len(self.p.prompts) * self.p.best_of

    async def prepare(self) -> None:
        """Score the prompts (echo with logprobs), or route them when nothing is generated (so
        the gates can be reported): in a worker thread, between the scheduler's steps."""
        p = self.p
        want = p.echo and p.logprobs is not None
        if not want and not (p.score_only and self.personas.any):
            return
        sched = self.engine.scheduler()

        def work():
            with sched.lock:
                if want:
                    return score_rows(self.engine, p.prompts, self.personas, p.logprobs)
                self.personas.route_each(self.engine.model, p.prompts)
        self.scores = await asyncio.to_thread(work)

    def submit(self) -> None:
        """best_of requests per prompt on the shared scheduler (all or none)."""
        if self.p.score_only:
            return
        sched = self.engine.scheduler()
        try:
            for ids in self.p.prompts:
                self.reqs.append([sched.submit(ids, self.p.candidate_params(i),
                                               self.p.personas.select([0]))
                                  for i in range(self.p.best_of)])
        except RequestError as e:
            self.cancel()
            raise APIError(400, str(e), "max_tokens") from None

    def cancel(self) -> None:
        for r in self.all_reqs:
            if not r.done:
                r.cancel()

    async def results(self) -> list[list]:
        return [list(await asyncio.gather(*(r.aresult() for r in rs))) for rs in self.reqs]

    # bodies -----------------------------------------------------------------------------------
    def usage(self, outs: list[list]) -> dict:
        prompt = sum(len(ids) for ids in self.p.prompts)
        done = sum(len(o.token_ids) for os_ in outs for o in os_)
        def most(field):
            return sum(max((getattr(o, field, 0) for o in os_), default=0) for os_ in outs)
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
                "prompt_tokens_details": {"cached_tokens": most("cached_tokens"),
                                          "shared_cached_tokens": most("shared_cached_tokens")}}

    def body(self, rid: str, outs: list[list]) -> dict:
        """The non-streamed body: for each prompt its n best candidates (or, scoring only, n
        choices of the echoed prompt)."""
        p, choices = self.p, []
        for j in range(len(p.prompts)):
            chosen = self._best(outs[j]) if outs else [None] * p.n
            for c, out in enumerate(chosen):
                text, lp = self._text_and_logprobs(j, out)
                gates = out.gates if out is not None else self.personas.report(j)
                choices.append(choice_body(p.kind, j * p.n + c, text,
                                           out.finish_reason if out is not None else "length",
                                           lp, gates))
        return response(p, rid, choices, self.usage(outs))

    def _best(self, cands: list) -> list:
        if self.p.best_of == self.p.n:
            return cands

        def mean_lp(o) -> float:
            return sum(e.logprob for e in o.logprobs) / max(1, len(o.logprobs))
        return sorted(cands, key=mean_lp, reverse=True)[:self.p.n]

    def _echo(self, j: int) -> str:
        return self.p.texts[j] if self.p.echo else ""

    def _text_and_logprobs(self, j: int, out):
        """Choice text (the echoed prompt first) and its logprobs in the endpoint's shape."""
        p, echo = self.p, self._echo(j)
        text = echo + (out.text if out is not None else "")
        if p.logprobs is None:
            return text, None
        if p.kind == "chat":
            return text, chat_logprobs(self.tok, out.logprobs)
        parts = []
        if p.echo:
            parts.append(completion_logprobs(self.tok, p.prompts[j], self.scores[j]))
        if out is not None:
            parts.append(completion_logprobs(self.tok, out.token_ids, out.logprobs, len(echo)))
        merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for part in parts:
            merged = merge_completion_logprobs(merged, part)
        return text, merged

    # streaming --------------------------------------------------------------------------------
    async def events(self, rid: str, deadline: float):
        """Chunks (dicts) as the choices' text is released: each choice's echo first, then
        pieces from whichever choice has one, each choice's final chunk, the usage chunk if
        asked.  Raises asyncio.TimeoutError past ``deadline``."""
        p, created = self.p, int(time.time())
        flat = [(j * p.n + c, r) for j, rs in enumerate(self.reqs) for c, r in enumerate(rs)]
        first = {i: True for i in range(len(p.prompts) * p.n)}
        offset = {i: 0 for i in first}
        for obj in self._opening(rid, created, first, offset):
            yield obj
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, req) -> None:
            try:
                async for piece in req.atext():
                    await queue.put((i, req, piece))
                await queue.put((i, req, None))
            except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
                await queue.put((i, req, e))
        tasks = [asyncio.ensure_future(pump(i, r)) for i, r in flat]
        seen = {i: 0 for i in first}                          # logprobs already sent
        try:
            left = len(tasks)
            while left:
                i, req, piece = await asyncio.wait_for(queue.get(),
                                                       max(0.0, deadline - time.monotonic()))
                if isinstance(piece, Exception):
                    raise piece
                lp = self._new_logprobs(i, req, seen, offset[i])
                if piece is None:                             # done: no lock needed
                    out = req.output()
                    yield chunk(p, rid, created, "", out.finish_reason, first=first[i],
                                gates=out.gates, index=i, logprobs=lp)
                    left -= 1
                else:
                    yield chunk(p, rid, created, piece, first=first[i], index=i, logprobs=lp)
                    offset[i] += len(piece)
                first[i] = False
            if p.include_usage:
                yield chunk(p, rid, created, None, usage=self.usage(
                    [[r.output() for r in rs] for rs in self.reqs]))
        finally:
            for t in tasks:
                t.cancel()

    def _opening(self, rid: str, created: int, first: dict, offset: dict):
        """Before any new token: each choice's echoed prompt (with its logprobs), and with
        max_tokens 0 each choice's final chunk."""
        p = self.p
        for j in range(len(p.prompts)):
            for i in range(j * p.n, (j + 1) * p.n):
                if p.echo:
                    lp = completion_logprobs(self.tok, p.prompts[j], self.scores[j]) \
                        if p.logprobs is not None else None
                    yield chunk(p, rid, created, self._echo(j), index=i, logprobs=lp)
                    offset[i], first[i] = len(self._echo(j)), False
                if p.score_only:
                    yield chunk(p, rid, created, "", "length", first=first[i],
                                gates=self.personas.report(j), index=i)

    def _new_logprobs(self, i: int, req, seen: dict, offset: int):
        """The logprobs of ``req``'s tokens not yet sent (None without logprobs or new ones)."""
        if self.p.logprobs is None:
            return None
        k = len(req.logprobs)
        entries, start = req.logprobs[seen[i]:k], seen[i]
        seen[i] = k
        if not entries and self.p.kind == "chat":
            return None
        ids = req.tokens[start:start + len(entries)]
        if self.p.kind == "chat":
            return chat_logprobs(self.tok, entries)
        return completion_logprobs(self.tok, ids, entries, offset)
