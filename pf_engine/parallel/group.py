"""How the ranks of one engine meet: their process group and the sum (Block.reduce) each uses.

    pg = make_group(rank, world, port, timeout_s, device, master=None)
    reduce = make_reducer(spec, rank, world, pg, timeout_s)

The group is torch.distributed's, on a TCPStore of the engine's own on 127.0.0.1 (so the engine
never touches the default group): ``ProcessGroupGloo`` for CPU ranks, ``ProcessGroupNCCL`` for
CUDA ranks (one GPU each).  The sum goes through it (gloo, nccl) or, for CPU ranks, through a
shared-memory segment (shm.py), which is the default there (options.allreduce_kind).
"""
from __future__ import annotations

import datetime

HOST = "127.0.0.1"


def make_group(rank: int, world: int, port: int, timeout_s: float, device: str = "cpu",
               master=None):
    """This rank's process group (``master``: rank 0's store, which listens on ``port``)."""
    import torch.distributed as dist
    timeout = datetime.timedelta(seconds=timeout_s)
    store = master or dist.TCPStore(HOST, port, world, is_master=False, timeout=timeout)
    if device == "cuda":
        from torch.distributed import ProcessGroupNCCL
        opts = ProcessGroupNCCL.Options()
        opts.is_high_priority_stream = False
        opts._timeout = timeout
        return ProcessGroupNCCL(store, rank, world, opts)
    return dist.ProcessGroupGloo(store, rank, world, timeout)


def reducer(pg=None):
    """The sum over the ranks of a tensor: through process group ``pg`` (torch.distributed's
    default group when None).  On NCCL, ``wait`` orders the compute stream after the
    all-reduce; the host does not wait."""
    import torch.distributed as dist

    def reduce(t):
        t = t.contiguous()
        if pg is None:
            dist.all_reduce(t)
        else:
            pg.allreduce([t]).wait()
        return t
    return reduce


def make_reducer(spec: dict, rank: int, world: int, pg, timeout_s: float):
    """This rank's sum over the ranks: through the segment spec["shm"] or through ``pg``."""
    if spec["allreduce"] == "shm":
        from pf_engine.parallel.shm import ShmReducer
        return ShmReducer(spec["shm"], rank, world, timeout_s)
    return reducer(pg)
