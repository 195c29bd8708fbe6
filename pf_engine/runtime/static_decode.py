"""A decode step with static shapes, which a GPU can capture in CUDA graphs.

The step runner's dynamic decode (runner.StepRunner._forward) shapes each forward to its batch:
n rows, the
attention over max(length) + 1 columns, the active experts' rows gathered.  Replaying a captured
graph needs every shape and address fixed, so this step is a function of device buffers only:

    tokens   runner.last_tok[:nb]           the last token of each slot
    lengths  StaticDecode.lengths[:nb]      the column each slot writes next (kept on the device)
    gates    runner.gates[:nb], token_rows[:nb]

for nb = the batch-size bucket (the next power of two >= the decoding requests, at most the pool)
and the attention over ``end`` = the longest length rounded up to COLUMN_BUCKET columns.  Rows
past the decoding requests are padding: they belong to slots being prefilled or free, and write
their garbage key/value at their own next column, which is overwritten before anything reads it;
their outputs are dropped.  The mixing reads all experts (no active-set gather), so a batch's
persona mix never changes a shape.  Graphs are keyed by (nb, end, any persona, any token routing).

mode "static": the same function run eagerly (CPU tests compare it with the dynamic step);
mode "graphs": captured per key on first use (after a warm-up on a side stream) and replayed.
"""
from __future__ import annotations

import torch

from pf_engine.model.step import Step
from pf_engine.persona.mix import Mix
from pf_engine.model.kv_cache import RowsView

COLUMN_BUCKET = 256


class CaptureFailed(RuntimeError):
    """Capturing a step failed; the runner warns once and goes on with dynamic decoding."""


def batch_bucket(n: int, slots: int) -> int:
    return min(slots, 1 << max(0, n - 1).bit_length())


def column_bucket(end: int, max_len: int) -> int:
    return min(max_len, -(-end // COLUMN_BUCKET) * COLUMN_BUCKET)


class StaticDecode:
    """The static decode step over a StepRunner's buffers (runner.py), which owns it."""

    def __init__(self, runner, graphs: bool):
        if graphs and runner.engine.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.runner, self.graphs = runner, graphs
        self.lengths = torch.zeros(runner.slots, dtype=torch.long, device=runner.engine.device)
        self._captured: dict = {}
        self._pool = None

    def forward(self, reqs: list, step: Step):
        """Logits [nb, V] of the nb-row step for the decoding ``reqs`` (slots 0..n-1), and its Mix
        (None without personas) whose ``token_sum`` holds the token-routed gates; ``step``
        (model/step.py) says whether any row has a persona or token routing."""
        s = self.runner
        nb = batch_bucket(len(reqs), s.slots)
        end = column_bucket(max(r.length for r in reqs) + 1, s.max_len)
        key = (nb, end, step.mixed, step.token)
        if not self.graphs:
            return self._step(*key)
        got = self._captured.get(key)
        if got is None:
            try:
                got = self._captured[key] = self._capture(key)
            except Exception as e:  # noqa: BLE001 - any failure: the runner decodes without
                raise CaptureFailed(f"CUDA graph capture failed ({type(e).__name__}: {e}); "
                                    "decoding without graphs") from e
        graph, out = got
        graph.replay()
        return out

    def _step(self, nb: int, end: int, mixed: bool, any_token: bool):
        s, eng = self.runner, self.runner.engine
        mix = None
        if mixed:
            mix = Mix.for_rows(s.gates[:nb], s.token_rows[:nb], 1, eng.bank.token_router,
                               tuple(range(s.gates.shape[1])), any_token, static=True)
        view = RowsView.static(s.cache, nb, self.lengths[:nb], end)
        positions = s.positions(view)
        logits = eng.model(s.last_tok[:nb].view(nb, 1), positions, view,
                           view.mask(eng.config.sliding_window), mix=mix,
                           step=Step(True, mixed, any_token))[:, -1]
        return logits, mix

    def _capture(self, key):
        """Warm up on a side stream (allocations, lazy initialisation, kernel compilation), then
        capture one step into a graph sharing one memory pool with the others."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):        # writes the same keys/values the real step writes
                self._step(*key)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a client thread's CUDA work (submit's small copies, a server's handlers)
        # may go on during the capture; "global" mode fails the capture for it.
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            out = self._step(*key)
        self._pool = graph.pool()
        return graph, out
