"""The engine's tensor-parallel group on the CPU: rank 0 is the calling process, ranks 1..N-1 are
worker processes the engine starts and stops.

    workers = Workers(n, spec, timeout_s)      # spawn, rendezvous on 127.0.0.1, load the shards
    model = TPDecoder(local_shard, workers)    # what Engine.model is: Decoder's interface

Rank 0 sends each model call to every worker once, as one message on its pipe (the call's
tokens, positions, mask, gates and which cache rows it writes), then runs its own shard; the
ranks meet only in the blocks' all-reduces.  Those go through shared memory (shm.py: csrc/cpu's
ShmGroup, ``PF_TP_ALLREDUCE=shm``, the default where csrc/cpu is built) or through gloo
(``PF_TP_ALLREDUCE=gloo``: ``ProcessGroupGloo`` on a TCPStore of its own, so the engine never
touches torch.distributed's default group; the group forms either way).  Workers mirror rank
0's KV slot pools (``TPDecoder.slot_cache``): one per scheduler, with its moves.

Faults.  A call first checks that every worker is alive; a worker that dies or raises leaves its
group (gloo: its sockets close; shm: rank 0's watchdog sees its process end and aborts the
group), so rank 0's all-reduce fails at once; one that hangs makes rank 0's all-reduce time out
after ``timeout_s``.  Either way rank 0 raises one ParallelError naming the worker, stops the
others and refuses further calls.  Workers exit when rank 0 asks, when the engine is collected,
and when rank 0's process is gone (they poll for it, and their watchdog aborts a wait), so none
is orphaned.
"""
from __future__ import annotations

import datetime
import itertools
import os
import traceback
import weakref

import torch
import torch.multiprocessing as mp

from pf_engine.errors import PFError
from pf_engine.model.decoder import Scratch
from pf_engine.persona.mix import Mix
from pf_engine.runtime.kv_cache import RowsView, SlotCache

HOST = "127.0.0.1"
ALLREDUCES = ("shm", "gloo")


class ParallelError(PFError):
    pass


def _group(rank: int, world: int, port: int, timeout_s: float, master=None):
    import torch.distributed as dist
    timeout = datetime.timedelta(seconds=timeout_s)
    store = master or dist.TCPStore(HOST, port, world, is_master=False, timeout=timeout)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


# what travels on a pipe ------------------------------------------------------------------------
def cache_desc(cache):
    if cache is Scratch:
        return None
    return (cache.pool.key, cache.s0, list(cache.starts), list(cache.counts))


def mix_desc(mix):
    if mix is None:
        return None
    return (mix.fixed, mix.token_rows, mix.active, mix.token_router is not None)


class TPSlotCache(SlotCache):
    """Rank 0's slot pool: its own heads' KV, every move mirrored on the workers."""

    def __init__(self, model, key: int, *args):
        super().__init__(*args)
        self.key, self._workers = key, model.workers

    def move(self, src: int, dst: int, length: int) -> None:
        self._workers.send(("move", self.key, src, dst, length))
        super().move(src, dst, length)


class TPDecoder:
    """Rank 0's model: Decoder's interface over its shard, each call sent to the workers first."""

    _keys = itertools.count()

    def __init__(self, local, workers: "Workers"):
        self.local, self.workers = local, workers

    def __getattr__(self, name):
        return getattr(self.local, name)

    def __call__(self, tokens, positions, cache, mask, mix=None, pick=None):
        self.workers.send(("forward", tokens, positions, cache_desc(cache), mask, mix_desc(mix), pick))
        return self.workers.guard(lambda: self.local(tokens, positions, cache, mask, mix=mix, pick=pick))

    def hidden(self, tokens, layers: int):
        self.workers.send(("hidden", tokens, layers))
        return self.workers.guard(lambda: self.local.hidden(tokens, layers))

    def slot_cache(self, slots: int, max_len: int) -> TPSlotCache:
        key = next(self._keys)
        self.workers.send(("cache", key, slots, max_len))
        c = self.local.cfg
        cache = TPSlotCache(self, key, c.num_hidden_layers, slots, c.num_key_value_heads, max_len,
                            c.head_dim, self.local.dtype, self.local.device)
        weakref.finalize(cache, self.workers.send_quiet, ("drop", key))
        return cache


class Workers:
    """Ranks 1..n-1: their processes, pipes and rank 0's process group."""

    def __init__(self, n: int, spec: dict, timeout_s: float = 60.0):
        import torch.distributed as dist
        self.n, self.timeout_s, self.failed = n, timeout_s, None
        self.dogs = []                 # the watchdog (shm), a list so that _stop holds no self
        timeout = datetime.timedelta(seconds=timeout_s)
        store = dist.TCPStore(HOST, 0, n, is_master=True, timeout=timeout, wait_for_workers=False)
        if spec["allreduce"] == "shm":
            from pf_engine.parallel.shm import create_segment
            spec = dict(spec, shm=create_segment(n))
        ctx = mp.get_context("spawn")
        self.pipes, self.procs = [], []
        for rank in range(1, n):
            here, there = ctx.Pipe()
            p = ctx.Process(target=worker_main, args=(rank, n, store.port, spec, timeout_s, there, os.getpid()),
                            daemon=True, name=f"pf-tp-{rank}")
            p.start()
            there.close()
            self.pipes.append(here)
            self.procs.append(p)
        self._finalizer = weakref.finalize(self, _stop, self.pipes, self.procs, self.dogs)
        try:
            self._wait_for("hello", timeout_s)        # a worker that cannot even start: at once
            self.pg = _group(0, n, store.port, timeout_s, master=store)
            self.reduce = _reducer(spec, 0, n, self.pg, timeout_s)
            self._wait_for("ready", timeout_s)        # every worker has mapped the segment
        except BaseException as e:
            self.close()
            if isinstance(e, ParallelError):
                raise
            raise ParallelError(f"tensor-parallel group of {n} did not form: {self._why() or e}") from None
        finally:
            if spec.get("shm"):
                os.unlink(spec["shm"])                # the mappings stay; nothing is left in /dev/shm
        if spec["allreduce"] == "shm":
            from pf_engine.parallel.shm import Watchdog
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
                    raise ParallelError(f"tensor-parallel {why} before it was {what}; if this runs from a "
                                        "script, guard its code with if __name__ == '__main__' (workers "
                                        "are spawned and import it)")
                if time.monotonic() > deadline:
                    raise ParallelError(f"tensor-parallel worker {rank} sent no {what} within {timeout_s:g} s")
            msg = pipe.recv()
            if msg[0] != what:
                raise ParallelError(f"tensor-parallel worker {rank}: {msg[1] if msg[0] == 'error' else msg}")

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
            raise ParallelError(f"the tensor-parallel group has failed ({self.failed}); build a new engine")
        why = self._why()
        if why:
            self._fail(why)
        for pipe in self.pipes:
            try:
                pipe.send(cmd)
            except (BrokenPipeError, OSError):
                self._fail(self._why() or "a worker's pipe is closed")

    def send_quiet(self, cmd) -> None:
        try:
            if not self.failed:
                for pipe in self.pipes:
                    pipe.send(cmd)
        except (BrokenPipeError, OSError):
            pass

    def guard(self, fn):
        """fn() (rank 0's part of a call); a collective that fails becomes one ParallelError."""
        try:
            return fn()
        except RuntimeError as e:
            text = str(e).lower()
            if self.failed or "gloo" in text or "all-reduce" in text or "timed out" in text or self._why():
                self._fail(self._why() or f"worker (of ranks 1..{self.n - 1}) did not answer an all-reduce "
                           f"within {self.timeout_s:g} s")
            raise

    def _fail(self, why: str):
        self.failed = why
        self.close()
        raise ParallelError(f"tensor-parallel {why}; the engine's group is stopped")

    def close(self) -> None:
        self._finalizer()


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


# the worker side -------------------------------------------------------------------------------
def worker_main(rank: int, n: int, port: int, spec: dict, timeout_s: float, pipe, parent: int) -> None:
    """A worker's life: join the group, build its shard, then run rank 0's calls until told to
    exit or until rank 0's process is gone."""
    try:
        pipe.send(("hello",))
        torch.set_num_threads(spec.get("threads") or 1)
        pg = _group(rank, n, port, timeout_s)
        reduce = _reducer(spec, rank, n, pg, timeout_s)
        if spec["allreduce"] == "shm":     # rank 0 gone mid-step: the wait fails, the worker exits
            from pf_engine.parallel.shm import Watchdog
            Watchdog(reduce, alive=lambda: os.getppid() == parent)
        model, bank = build_shard(spec, rank, n, reduce)
        pipe.send(("ready",))
        caches: dict[int, SlotCache] = {}
        while True:
            if not pipe.poll(1.0):
                if os.getppid() != parent:
                    return
                continue
            cmd = pipe.recv()
            if cmd[0] == "exit":
                return
            with torch.inference_mode():
                run(cmd, model, bank, caches)
    except (EOFError, KeyboardInterrupt):
        return
    except BaseException as e:  # noqa: BLE001 - rank 0 reads why, then sees the group fail
        try:
            pipe.send(("error", f"{type(e).__name__}: {e}".splitlines()[0][:300]))
        except (BrokenPipeError, OSError):
            pass
        traceback.print_exc()
        os._exit(1)


def _reducer(spec: dict, rank: int, n: int, pg, timeout_s: float):
    """This rank's sum over the ranks (Block.reduce): through the segment or through gloo."""
    from pf_engine.parallel.tp import reducer
    if spec["allreduce"] == "shm":
        from pf_engine.parallel.shm import ShmReducer
        return ShmReducer(spec["shm"], rank, n, timeout_s)
    return reducer(pg)


def allreduce_kind(device) -> str:
    """``PF_TP_ALLREDUCE`` (shm or gloo), else shm where csrc/cpu runs, else gloo."""
    from pf_engine.parallel.shm import shm_available
    want = os.environ.get("PF_TP_ALLREDUCE")
    if want is not None:
        if want not in ALLREDUCES:
            raise PFError(f"PF_TP_ALLREDUCE={want!r}: expected one of {', '.join(ALLREDUCES)}")
        if want == "shm" and not shm_available():
            raise PFError("PF_TP_ALLREDUCE='shm' needs csrc/cpu built for this CPU (pf_kernels.cpu_ops)")
        return want
    return "shm" if shm_available() else "gloo"


def head_kind() -> str:
    """``PF_TP_HEAD``: the LM head "sharded" by vocabulary (the default) or "replicated"."""
    from pf_engine.parallel.tp import HEADS
    want = os.environ.get("PF_TP_HEAD", "sharded")
    if want not in HEADS:
        raise PFError(f"PF_TP_HEAD={want!r}: expected one of {', '.join(HEADS)}")
    return want


def build_shard(spec: dict, rank: int, n: int, reduce):
    """This worker's shard of the model rank 0 loaded (the same files, the same bank)."""
    from pf_engine.backends import resolve_backend
    from pf_engine.model.config import ModelConfig
    from pf_engine.model.loading import load_weights
    from pf_engine.parallel.tp import shard_model
    cfg = ModelConfig.from_file(os.path.join(spec["folder"], "config.json"))
    device = torch.device(spec["device"])
    weights = load_weights(spec["folder"], cfg, spec["dtype"], device)
    bank = spec["bank"]
    if bank is not None:
        bank.to(dtype=spec["dtype"], device=device)
    backend = resolve_backend(spec["backend"], device)
    return shard_model(cfg, weights, bank, backend, device, rank, n, reduce, spec["head"]), bank


def run(cmd, model, bank, caches) -> None:
    op = cmd[0]
    if op == "forward":
        _, tokens, positions, cdesc, mask, mdesc, pick = cmd
        cache = Scratch if cdesc is None else RowsView(caches[cdesc[0]], *cdesc[1:])
        mix = None
        if mdesc is not None:
            fixed, token_rows, active, token = mdesc
            mix = Mix(fixed, bank.token_router if token else None, token_rows, active, token)
        model(tokens, positions, cache, mask, mix=mix, pick=pick)
    elif op == "hidden":
        model.hidden(cmd[1], cmd[2])
    elif op == "cache":
        _, key, slots, max_len = cmd
        c = model.cfg
        caches[key] = SlotCache(c.num_hidden_layers, slots, c.num_key_value_heads, max_len, c.head_dim,
                                model.dtype, model.device)
    elif op == "move":
        caches[cmd[1]].move(*cmd[2:])
    elif op == "drop":
        caches.pop(cmd[1], None)
    else:
        raise ValueError(f"unknown tensor-parallel call {op!r}")


# the engine's side ------------------------------------------------------------------------------
def check_parallel(cfg, n, device, quantize) -> int:
    """``n`` checked against the model and the other settings (one PFError line each)."""
    from pf_engine.parallel.shard import check
    n = check(cfg, n)
    if n == 1:
        return n
    if device.type != "cpu":
        raise PFError(f"tensor_parallel={n} on {device.type}: only CPU ranks (gloo) are built so far")
    if quantize not in (None, "f32"):
        raise PFError(f"tensor_parallel={n} with quantize={quantize!r}: shards are float tensors "
                      "(pass no quantize, or quantize='f32')")
    if n > (os.cpu_count() or 1):
        raise PFError(f"tensor_parallel={n}: more ranks than this machine's {os.cpu_count() or 1} CPU cores")
    return n


def tp_model(engine, weights, timeout_s: float | None = None) -> TPDecoder:
    """Rank 0's TPDecoder for ``engine`` (its folder, dtype, backend and bank), its workers
    started.  The whole weights are loaded here and in each worker, then sharded."""
    from pf_engine.parallel.tp import shard_model
    n = engine.tensor_parallel
    timeout_s = timeout_s or float(os.environ.get("PF_TP_TIMEOUT_S", 60))
    spec = {"folder": engine.folder, "dtype": engine.dtype, "device": engine.device.type,
            "backend": engine.backend.name, "bank": engine.bank, "threads": torch.get_num_threads(),
            "allreduce": allreduce_kind(engine.device), "head": head_kind()}
    workers = Workers(n, spec, timeout_s)
    local = shard_model(engine.config, weights, engine.bank, engine.backend, engine.device, 0, n,
                        workers.reduce, spec["head"])
    return TPDecoder(local, workers)
