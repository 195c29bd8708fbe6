"""The all-reduce of CPU ranks on one machine through shared memory (csrc/cpu's ShmGroup),
instead of gloo's sockets.

    path = create_segment(world)                  # rank 0, before it starts the workers
    red = ShmReducer(path, rank, world, timeout_s)  # every rank; rank 0 then unlinks the file
    y = red(t)                                    # the sum over the ranks of t (any shape)
    red.group                                     # what BlockPlan.step reduces through

A decode step of a 30-layer model makes 60 all-reduces of one hidden vector each (2.3 kB for
d = 576): through gloo each costs a round trip over loopback TCP; here it is a copy into this
rank's slot, a spin on the other ranks' counters and a sum of N slots in rank order (so every
rank holds bit-identical hidden states, which the token router and the next layer read).

Faults: a wait fails at once when the group's abort flag is set (a watchdog thread in each
process sets it when a rank's process is gone: ``Watchdog``) and after ``timeout_s`` otherwise.
"""
from __future__ import annotations

import mmap
import os
import tempfile
import threading
from multiprocessing.connection import wait

import numpy as np
import torch

CAPACITY = 1 << 18          # floats per round and rank (1 MiB); longer vectors take several rounds


def shm_available() -> bool:
    """Whether csrc/cpu (and so ShmGroup) is built and runs on this CPU."""
    from pf_kernels import cpu_ops
    return bool(cpu_ops.cpu_available()[0])


def create_segment(world: int, capacity: int = CAPACITY) -> str:
    """A zeroed file of ShmGroup.layout_bytes(world, capacity) bytes in /dev/shm (the temporary
    directory where there is none); its path."""
    from pf_kernels import cpu_ops
    where = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    fd, path = tempfile.mkstemp(prefix=f"pf-tp-{os.getpid()}-", dir=where)
    try:
        os.ftruncate(fd, cpu_ops.ShmGroup.layout_bytes(world, capacity))
    finally:
        os.close(fd)
    return path


class ShmReducer:
    """One rank's end of the segment at ``path``: ``red(t)`` sums t over the ranks."""

    def __init__(self, path: str, rank: int, world: int, timeout_s: float,
                 capacity: int = CAPACITY):
        from pf_kernels import cpu_ops
        size = cpu_ops.ShmGroup.layout_bytes(world, capacity)
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), size)
        self.group = cpu_ops.ShmGroup(np.frombuffer(self._map, dtype=np.uint8), rank, world,
                                      capacity, timeout_s)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of t (every rank passes the same shape); fp32 t is summed in
        place, other dtypes through an fp32 copy."""
        y = t.contiguous() if t.dtype == torch.float32 else t.float()
        self.group.allreduce(y.numpy())
        return y if y.dtype == t.dtype else y.to(t.dtype)

    def abort(self) -> None:
        self.group.abort()


class Watchdog:
    """A daemon thread that aborts ``reducer``'s group when one of ``sentinels`` (processes'
    sentinels, multiprocessing.Process.sentinel) becomes ready, or when ``alive()`` turns false
    (polled every ``poll_s``); ``stop()`` ends it without aborting."""

    def __init__(self, reducer: ShmReducer, sentinels=(), alive=None, poll_s: float = 0.2):
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run,
                                        args=(reducer, list(sentinels), alive, poll_s),
                                        daemon=True, name="pf-tp-watchdog")
        self._thread.start()

    def _run(self, reducer, sentinels, alive, poll_s) -> None:
        while True:
            ready = wait([self._stop_r, *sentinels], timeout=poll_s)
            if self._stop_r in ready:
                return
            if ready or (alive is not None and not alive()):
                reducer.abort()
                return

    def stop(self) -> None:
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        self._thread.join(timeout=5)
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
