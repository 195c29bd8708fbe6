"""A worker rank (1..N-1) of a tensor-parallel engine: a process of its own (spawned by rank 0,
or started by torchrun on any host: launch.py) that joins rank 0's group, loads the model's files
and keeps its shard, then runs the calls rank 0 sends on its pipe or store channel
(runtime.TPDecoder; channel.py), one message per call:

    ("forward", tokens, positions, cache, mask, mix, pick)   the shard's forward (logits dropped)
    ("hidden", tokens, layers)                               the sequence router's input pass
    ("cache", key, slots, max_len) / ("move", key, src, dst, length) / ("drop", key)
                                                             its mirror of rank 0's slot pools
    ("save", key, slot, c0, c1, handle) / ("load", key, slot, c0, handle) / ("forget", handle)
                                                             its heads of the prefix-cache blocks
    ("exit",)

Tensors travel by value on the host (``Wire``) and are moved to this rank's device (cuda:rank,
or the CPU) once per call.  Replies: ("hello",) once started, ("ready",) once its shard is built,
("error", line)
before it exits on an exception.
"""
from __future__ import annotations

import os
import time
import traceback

import torch

from pf_engine.model.decoder import SCRATCH
from pf_engine.persona.mix import Mix
from pf_engine.model.kv_cache import RowsView, SlotCache


class Wire:
    """A tensor as it travels on a pipe: its bytes on the host (numpy pickles by value; a torch
    tensor through multiprocessing would move its storage into shared memory and pass a file
    descriptor, ~0.5 ms a call)."""
    __slots__ = ("array", "dtype")

    def __init__(self, t: torch.Tensor):
        t = t.detach().cpu().contiguous()
        self.dtype = t.dtype
        self.array = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()

    def __getstate__(self):
        return self.array, self.dtype

    def __setstate__(self, state):
        self.array, self.dtype = state

    def tensor(self, device) -> torch.Tensor:
        t = torch.from_numpy(self.array)
        return (t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t).to(device)


def to_wire(obj):
    """obj with every tensor in it (through tuples and lists) as a Wire."""
    if isinstance(obj, torch.Tensor):
        return Wire(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_wire(x) for x in obj)
    return obj


def from_wire(obj, device):
    """to_wire's inverse, the tensors on ``device``."""
    if isinstance(obj, Wire):
        return obj.tensor(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(from_wire(x, device) for x in obj)
    return obj


def rank_device(spec: dict, rank: int) -> torch.device:
    """Rank ``rank``'s device: cuda:(first + rank), rank 0 being the engine's own GPU (the one
    rule: options.first_gpu), or the CPU."""
    if spec["device"] != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", spec.get("first_gpu", 0) + rank)


def worker_main(rank: int, n: int, port: int, spec: dict, timeout_s: float, pipe,
                parent: int) -> None:
    """A spawned worker's life (runtime.Workers): join the group on rank 0's store at
    127.0.0.1:``port``, then ``serve_calls`` until told to exit or rank 0's process is gone."""
    from pf_engine.parallel.group import make_group
    code = serve_calls(rank, n, pipe, timeout_s, spec=spec,
                       group=lambda sp: make_group(rank, n, port, timeout_s, sp["device"]),
                       alive=lambda: os.getppid() == parent)
    if code:
        os._exit(code)


def serve_calls(rank: int, n: int, pipe, timeout_s: float, group, spec: dict | None = None,
                alive=lambda: True) -> int:
    """Say hello, join the group (``group(spec)``: this rank's process group), build the shard,
    say ready, then run the calls that come on ``pipe`` (a multiprocessing pipe, or a
    channel.StoreChannel whose first message is the spec) until ("exit",), the pipe's end, or
    ``alive()`` turning false.  0 then; 1 after an error, which it has sent as ("error", line)."""
    from pf_engine.parallel.group import make_reducer
    try:
        pipe.send(("hello",))
        if spec is None:
            spec = pipe.recv()
        torch.set_num_threads(spec.get("threads") or 1)
        device = rank_device(spec, rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        pg = group(spec)
        reduce = make_reducer(spec, rank, n, pg, timeout_s)
        if spec["allreduce"] == "shm":     # rank 0 gone mid-step: the wait fails, the worker exits
            from pf_engine.parallel.shm import Watchdog
            Watchdog(reduce, alive=alive)
        model, bank = build_shard(spec, rank, n, reduce, device)
        pipe.send(("ready",))
        caches: dict[int, SlotCache] = {}
        blocks: dict[int, tuple] = {}          # prefix-cache blocks: its heads' k, v by handle
        while True:
            if not next_call(pipe):
                if not alive():
                    return 0
                continue
            cmd = pipe.recv()
            if cmd[0] == "exit":
                return 0
            with torch.inference_mode():
                run(from_wire(cmd, device), model, bank, caches, blocks)
    except (EOFError, KeyboardInterrupt):
        return 0
    except BaseException as e:  # noqa: BLE001 - rank 0 reads why, then sees the group fail
        try:
            pipe.send(("error", f"{type(e).__name__}: {e}".splitlines()[0][:300]))
        except (BrokenPipeError, OSError, RuntimeError):
            pass
        traceback.print_exc()
        return 1


SPIN_S = 0.002      # how long a worker polls for rank 0's next call before it sleeps on the pipe


def next_call(pipe) -> bool:
    """Whether a call is waiting on ``pipe``, within about a second.  Decode steps follow each
    other within a millisecond or two: polling (yielding the core) that long first saves the
    wake-up of a sleeping process on every step."""
    deadline = time.monotonic() + SPIN_S
    while time.monotonic() < deadline:
        if pipe.poll(0):
            return True
        os.sched_yield()
    return pipe.poll(1.0)


def build_shard(spec: dict, rank: int, n: int, reduce, device: torch.device):
    """This worker's shard of the model rank 0 loaded (the same files, the same bank)."""
    from pf_engine.backends import resolve_backend
    from pf_engine.model.config import ModelConfig
    from pf_engine.model.loading import load_weights
    from pf_engine.parallel.tp import shard_model
    cfg = ModelConfig.from_file(os.path.join(spec["folder"], "config.json"))
    weights = load_weights(spec["folder"], cfg, spec["dtype"], device, *spec["load"])
    bank = spec["bank"]
    if bank is not None:
        bank.to(dtype=spec["dtype"], device=device)
    backend = resolve_backend(spec["backend"], device, spec["expert_format"],
                              spec["deterministic"])
    return shard_model(cfg, weights, bank, backend, device, rank, n, reduce, spec["head"]), bank


def run(cmd, model, bank, caches, blocks) -> None:
    op = cmd[0]
    if op == "forward":
        _, tokens, positions, cdesc, mask, mdesc, pick, step = cmd
        cache = SCRATCH if cdesc is None else RowsView(caches[cdesc[0]], *cdesc[1:])
        mix = None
        if mdesc is not None:
            fixed, token_rows, active, token = mdesc
            mix = Mix(fixed, bank.token_router if token else None, token_rows, active, token)
        model(tokens, positions, cache, mask, mix=mix, pick=pick, step=step)
    elif op == "hidden":
        model.hidden(cmd[1], cmd[2])
    elif op == "cache":
        _, key, slots, max_len = cmd
        caches[key] = SlotCache.for_model(model.cfg, slots, max_len, model.dtype, model.device)
    elif op == "move":
        caches[cmd[1]].move(*cmd[2:])
    elif op == "drop":
        caches.pop(cmd[1], None)
    elif op == "save":
        _, key, slot, c0, c1, handle = cmd
        blocks[handle] = caches[key].save(slot, c0, c1)
    elif op == "load":
        _, key, slot, c0, handle = cmd
        caches[key].load(slot, c0, blocks[handle])
    elif op == "forget":
        blocks.pop(cmd[1], None)
    else:
        raise ValueError(f"unknown tensor-parallel call {op!r}")
