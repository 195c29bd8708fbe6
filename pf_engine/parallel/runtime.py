"""The engine's tensor-parallel group: rank 0 is the calling process, ranks 1..N-1 are worker
processes (worker.py) the engine starts and stops.

    workers = Workers(n, spec, timeout_s)      # spawn, rendezvous on 127.0.0.1, load the shards
    model = TPDecoder(local_shard, workers)    # what Engine.model is: Decoder's interface

Rank 0 sends each model call to every worker once, as one message on its pipe (the call's
tokens, positions, mask, gates and which cache rows it writes), then runs its own shard; the
ranks meet only in the blocks' all-reduces (group.py: shared memory or gloo between CPU ranks,
nccl between CUDA ranks, one GPU each).  Tensors travel on the host, once per call.  Workers
mirror rank 0's KV slot pools (``TPDecoder.slot_cache``): one per scheduler, with its moves and
the prefix cache's saves and loads, each rank on its own heads (``TPBlock``).

Faults.  A call first checks that every worker is alive; a worker that dies or raises leaves its
group (gloo: its sockets close; shm: rank 0's watchdog sees its process end and aborts the
group), so rank 0's all-reduce fails at once; one that hangs makes rank 0's all-reduce time out
after ``timeout_s``.  Either way rank 0 raises one ParallelError naming the worker, stops the
others and refuses further calls.  (On nccl a dead peer is seen only through NCCL's own
timeout: this path has not run on GPUs yet.)
Workers exit when rank 0 asks, when the engine is collected,
and when rank 0's process is gone (they poll for it, and their watchdog aborts a wait), so none
is orphaned.
"""
from __future__ import annotations

import collections
import copy
import datetime
import itertools
import os
import re
import sys
import weakref

import torch
import torch.multiprocessing as mp

from pf_engine.errors import PFError
from pf_engine.model.decoder import SCRATCH
from pf_engine.model.step import WHOLE
from pf_engine.parallel.group import HOST, make_group, make_reducer
from pf_engine.parallel.options import allreduce_kind, first_gpu, head_kind
from pf_engine.parallel.shm import Watchdog, create_segment
from pf_engine.parallel.tp import shard_model
from pf_engine.parallel.worker import to_wire, worker_main
from pf_engine.model.kv_cache import SlotCache


class ParallelError(PFError):
    pass


# what travels on a pipe ------------------------------------------------------------------------
def cache_desc(cache):
    if cache is SCRATCH:
        return None
    return (cache.pool.key, cache.s0, list(cache.starts), list(cache.counts))


def mix_desc(mix):
    if mix is None:
        return None
    return (mix.fixed, mix.token_rows, mix.active, mix.token_router is not None)


def main_guard_hint() -> str:
    """Why a spawned rank may have died before it started, for an error message: the calling
    script (``__main__``'s file) has no ``if __name__ == "__main__":`` guard, so each rank,
    which re-imports it, started the engine again (multiprocessing refuses that).  Named when
    the script's text has no such guard; otherwise the general advice."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    src = None
    if path and os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                src = f.read()
        except (OSError, UnicodeDecodeError):
            src = None
    if src is not None and not re.search(r"__name__\s*==\s*['\"]__main__['\"]", src):
        return (f"; the script {path} has no `if __name__ == \"__main__\":` guard: each rank is "
                "a process that imports it and so started the engine again (put the script's "
                "code under that guard)")
    return ("; if this runs from a script, guard its code with if __name__ == '__main__' "
            "(workers are spawned and import it)")


class TPBlock:
    """A prefix-cache block under tensor parallelism: rank 0's heads' copy, and the handle under
    which each worker keeps its own heads' copy (forgotten there once this one is collected)."""

    _handles = itertools.count()

    def __init__(self, kv, workers: "Workers"):
        self.kv, self.handle = kv, next(self._handles)
        weakref.finalize(self, workers.later, ("forget", self.handle))


def whole_layers(layers: slice) -> None:
    """A tensor-parallel pool saves and loads whole blocks only: its prefix cache does not split
    them by layer (prefix_cache.split_layer is 0 under tensor parallelism)."""
    if layers != slice(None) and layers != slice(0, None):
        raise ValueError(f"layers={layers}: a tensor-parallel pool keeps whole blocks")


class TPSlotCache(SlotCache):
    """Rank 0's slot pool: its own heads' KV, every move, save and load mirrored on the workers
    (each on its own heads)."""

    spread_view = None     # no speculative verify: the workers rebuild consecutive rows only

    def __init__(self, *args, model, key: int):
        super().__init__(*args)
        self.key, self._workers = key, model.workers

    def move(self, src: int, dst: int, length: int) -> None:
        self._workers.send(("move", self.key, src, dst, length))
        super().move(src, dst, length)

    def save(self, slot: int, c0: int, c1: int, layers: slice = slice(None)) -> TPBlock:
        whole_layers(layers)
        blk = TPBlock(super().save(slot, c0, c1), self._workers)
        self._workers.send(("save", self.key, slot, c0, c1, blk.handle))
        return blk

    def load(self, slot: int, c0: int, kv: TPBlock, layers: slice = slice(None)) -> None:
        whole_layers(layers)
        self._workers.send(("load", self.key, slot, c0, kv.handle))
        super().load(slot, c0, kv.kv)


class TPDecoder:
    """Rank 0's model: Decoder's interface over its shard, by an explicit protocol.

    CALLS run the model: each is sent to every worker first, then run on rank 0's shard (the
    ranks meet in its all-reduces).  DATA are read from rank 0's shard.  LOCAL are Decoder
    methods that involve no other rank.  Any other name is an AttributeError at once: a Decoder
    method added later runs nowhere until it is put in one of these (tests/test_parallel.py
    holds every public Decoder method to this), instead of running on rank 0 alone and hanging
    its all-reduce."""

    CALLS = ("__call__", "hidden", "slot_cache")
    DATA = ("cfg", "dtype", "device", "backend", "blocks", "embed", "norm", "head", "rotary",
            "runner")
    LOCAL = ("embedding",)
    REFUSED = ("attach", "detach",           # each rank attaches its shard (tp.py); banks
               "layer_states",               # do not change at run time under TP
               "run_blocks", "resume",       # the prefix cache's split: 0 under TP (whole
               "lower")                      # blocks, prefix_cache.split_layer), and "auto"
                                             # routed by its own pass (runtime/routing.py)

    _keys = itertools.count()

    def __init__(self, local, workers: "Workers"):
        self.local, self.workers = local, workers

    def __getattr__(self, name):
        if name in self.DATA or name in self.LOCAL:
            return getattr(self.local, name)
        raise AttributeError(f"{name!r}: not part of the tensor-parallel model's protocol "
                             "(parallel/runtime.TPDecoder: CALLS, DATA, LOCAL)")

    def __setattr__(self, name, value):
        if name in self.DATA:                  # e.g. a test swapping the runner: rank 0's shard
            setattr(self.local, name, value)
        else:
            object.__setattr__(self, name, value)

    def __call__(self, tokens, positions, cache, mask, mix=None, pick=None, step=WHOLE):
        self.workers.send(("forward", tokens, positions, cache_desc(cache), mask, mix_desc(mix),
                           pick,
                           step))
        return self.workers.guard(lambda: self.local(tokens, positions, cache, mask, mix=mix,
                                                     pick=pick,
                                                     step=step))

    def hidden(self, tokens, layers: int):
        self.workers.send(("hidden", tokens, layers))
        return self.workers.guard(lambda: self.local.hidden(tokens, layers))

    def slot_cache(self, slots: int, max_len: int) -> TPSlotCache:
        key = next(self._keys)
        self.workers.send(("cache", key, slots, max_len))
        cache = TPSlotCache.for_model(self.local.cfg, slots, max_len, self.local.dtype,
                                      self.local.device, model=self, key=key)
        weakref.finalize(cache, self.workers.later, ("drop", key))
        return cache


class Workers:
    """Ranks 1..n-1: their processes, pipes and rank 0's process group."""

    def __init__(self, n: int, spec: dict, timeout_s: float = 60.0):
        import torch.distributed as dist
        self.n, self.timeout_s, self.failed = n, timeout_s, None
        self.dogs = []                 # the watchdog (shm), a list so that _stop holds no self
        self._later = collections.deque()
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(HOST, 0, n, is_master=True, timeout=timeout, wait_for_workers=False)
        if spec["allreduce"] == "shm":
            spec = dict(spec, shm=create_segment(n))
        ctx = mp.get_context("spawn")
        self.pipes, self.procs = [], []
        for rank in range(1, n):
            here, there = ctx.Pipe()
            p = ctx.Process(target=worker_main,
                            args=(rank, n, store.port, spec, timeout_s, there, os.getpid()),
                            daemon=True, name=f"pf-tp-{rank}")
            p.start()
            there.close()
            self.pipes.append(here)
            self.procs.append(p)
        self._finalizer = weakref.finalize(self, _stop, self.pipes, self.procs, self.dogs)
        try:
            self._wait_for("hello", timeout_s)        # a worker that cannot even start: at once
            self.pg = make_group(0, n, store.port, timeout_s, spec["device"], master=store)
            self.reduce = make_reducer(spec, 0, n, self.pg, timeout_s)
            self._wait_for("ready", timeout_s)        # every worker has mapped the segment
        except BaseException as e:
            self.close()
            if isinstance(e, ParallelError):
                raise
            raise ParallelError(f"tensor-parallel group of {n} did not form: "
                                f"{self._why() or e}") from None
        finally:
            if spec.get("shm"):
                os.unlink(spec["shm"])              # the mappings stay; nothing is left in /dev/shm
        if spec["allreduce"] == "shm":
            self.dogs.append(Watchdog(self.reduce, [p.sentinel for p in self.procs]))
        self.store = store

    def _wait_for(self, what: str, timeout_s: float) -> None:
        """Every worker's ``what`` message, checking every 0.2 s that none has died."""
        import time
        deadline = time.monotonic() + timeout_s
        for rank, pipe in enumerate(self.pipes, 1):
            while not pipe.poll(0.2):
                why = self._why()
                if why:
                    raise ParallelError(f"tensor-parallel {why} before it said {what}"
                                        f"{main_guard_hint()}")
                if time.monotonic() > deadline:
                    raise ParallelError(f"tensor-parallel worker {rank} sent no {what} "
                                        f"within {timeout_s:g} s")
            try:
                msg = pipe.recv()
            except (EOFError, OSError):               # it died: its end of the pipe closed
                self.procs[rank - 1].join(1.0)
                raise ParallelError(f"tensor-parallel {self._why() or f'worker {rank} exited'} "
                                    f"before it said {what}{main_guard_hint()}") from None
            if msg[0] != what:
                raise ParallelError(f"tensor-parallel worker {rank}: "
                                    f"{msg[1] if msg[0] == 'error' else msg}")

    def _why(self) -> str | None:
        """The first worker that is gone (and what it said), or None."""
        for rank, (p, pipe) in enumerate(zip(self.procs, self.pipes), 1):
            if not p.is_alive():
                said = ""
                try:
                    if pipe.poll(0):
                        msg = pipe.recv()
                        said = f": {msg[1]}" if msg[0] == "error" else ""
                except (EOFError, OSError):
                    pass
                return f"worker {rank} exited (code {p.exitcode}){said}"
        return None

    def send(self, cmd) -> None:
        if self.failed:
            raise ParallelError(f"the tensor-parallel group has failed ({self.failed}); "
                                "build a new engine")
        why = self._why()
        if why:
            self._fail(why)
        self._deliver([to_wire(c) for c in (*self._queued(), cmd)])   # on the host, by value

    def _deliver(self, cmds: list) -> None:
        for pipe in self.pipes:
            try:
                for c in cmds:
                    pipe.send(c)
            except (BrokenPipeError, OSError):
                self._fail(self._why() or "a worker's pipe is closed")

    def later(self, cmd) -> None:
        """``cmd`` sent before the next call (finalizers queue here: they may run on any thread,
        and a pipe takes one writer at a time)."""
        self._later.append(cmd)

    def _queued(self) -> list:
        out = []
        while self._later:
            out.append(self._later.popleft())
        return out

    def guard(self, fn):
        """fn() (rank 0's part of a call); a collective that fails becomes one ParallelError."""
        try:
            return fn()
        except RuntimeError as e:
            text = str(e).lower()
            if (self.failed or "gloo" in text or "all-reduce" in text or "timed out" in text
                    or self._why()):
                self._fail(self._why() or f"worker (of ranks 1..{self.n - 1}) "
                           "did not answer an all-reduce "
                           f"within {self.timeout_s:g} s")
            raise

    def _fail(self, why: str):
        self.failed = why
        self.close()
        raise ParallelError(f"tensor-parallel {why}; the engine's group is stopped")

    def close(self) -> None:
        self._finalizer()


class RemoteWorkers(Workers):
    """Ranks 1..n-1 started by torchrun, anywhere (launch.py): rank 0 holds the store at
    MASTER_ADDR:MASTER_PORT, posts the spec as the first message, then every call
    (channel.StoreChannel); the blocks' all-reduces go through gloo (nccl on CUDA) on that
    store.  A worker's death shows as its error reply or as a failed all-reduce."""

    def __init__(self, n: int, spec: dict, env: dict, timeout_s: float = 60.0):
        from pf_engine.parallel import launch
        from pf_engine.parallel.channel import StoreChannel
        self.n, self.timeout_s, self.failed = n, timeout_s, None
        self.dogs, self._later = [], collections.deque()
        spec = dict(spec, allreduce="nccl" if spec["device"] == "cuda" else "gloo")
        self.store = launch.store(env, timeout_s)
        self.chan = StoreChannel(self.store, 0, n, timeout_s)
        self._finalizer = weakref.finalize(self, self.chan.post, ("exit",))
        try:
            self._wait_for("hello", timeout_s)
            self.chan.post(spec)
            self.pg = launch._group(self.store, 0, n, timeout_s, spec)
            self.reduce = make_reducer(spec, 0, n, self.pg, timeout_s)
            self._wait_for("ready", timeout_s)
        except BaseException as e:
            if isinstance(e, ParallelError):
                raise
            raise ParallelError(f"tensor-parallel group of {n} (torchrun) did not form: "
                                f"{self._why() or e}") from None

    def _wait_for(self, what: str, timeout_s: float) -> None:
        import time
        deadline = time.monotonic() + timeout_s
        for rank in range(1, self.n):
            while (said := self.chan.said(rank)) is None or said[0] != what:
                if said is not None and said[0] == "error":
                    raise ParallelError(f"tensor-parallel worker {rank}: {said[1]}")
                if time.monotonic() > deadline:
                    raise ParallelError(f"tensor-parallel worker {rank} (torchrun) sent no "
                                        f"{what} within {timeout_s:g} s")
                time.sleep(0.05)

    def _why(self) -> str | None:
        for rank in range(1, self.n):
            said = self.chan.said(rank)
            if said is not None and said[0] == "error":
                return f"worker {rank} failed: {said[1]}"
        return None

    def _deliver(self, cmds: list) -> None:
        for c in cmds:
            self.chan.post(c)


def _stop(pipes, procs, dogs=()) -> None:
    for dog in dogs:
        dog.stop()
    for pipe in pipes:
        try:
            pipe.send(("exit",))
        except (BrokenPipeError, OSError):
            pass
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)


def tp_model(engine, weights, timeout_s: float | None = None) -> TPDecoder:
    """Rank 0's TPDecoder for ``engine`` (its folder, dtype, backend and bank), its workers
    started.  The whole weights are loaded here and in each worker, then sharded."""
    n = engine.tensor_parallel
    from pf_engine.parallel.launch import timeout_s as default_timeout, torchrun_env
    timeout_s = timeout_s or default_timeout()
    bank = engine.bank
    if bank is not None and engine.device.type != "cpu":     # the workers' copy travels on the host
        bank = copy.deepcopy(bank).to(device="cpu")
    spec = {"folder": engine.folder, "load": engine.load_args, "dtype": engine.dtype,
            "device": engine.device.type, "backend": engine.backend.name, "bank": bank,
            "expert_format": getattr(engine.backend, "expert_format", None),
            "deterministic": getattr(engine.backend, "deterministic", False),
            "threads": torch.get_num_threads(), "allreduce": allreduce_kind(engine.device),
            "head": head_kind(), "first_gpu": first_gpu(engine.device)}
    env = torchrun_env()
    workers = RemoteWorkers(n, spec, env, timeout_s) if env else Workers(n, spec, timeout_s)
    local = shard_model(engine.config, weights, engine.bank, engine.backend, engine.device, 0, n,
                        workers.reduce, spec["head"])
    return TPDecoder(local, workers)
