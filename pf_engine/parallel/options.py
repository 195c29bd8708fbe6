"""The choices of a tensor-parallel engine, each decided here: the rank count against the model
and the machine, how the ranks sum (``PF_TP_ALLREDUCE``), the LM head's split (``PF_TP_HEAD``).
"""
from __future__ import annotations

import contextlib
import os

from pf_engine.errors import PFError

ALLREDUCES = {"cpu": ("shm", "gloo"), "cuda": ("nccl",)}
HEADS = ("sharded", "replicated")


def check_parallel(cfg, n, device, stored_as_bytes: bool = False) -> int:
    """``n`` checked against the model, the device and (``stored_as_bytes``: 8/4/16-bit
    weights) the weights' blocks; one PFError line each."""
    from pf_engine.parallel.shard import check, check_blocks
    n = check(cfg, n)
    if n == 1:
        return n
    if device.type not in ALLREDUCES:
        raise PFError(f"tensor_parallel={n} on {device.type}: "
                      "expected cpu (shm or gloo) or cuda (nccl) ranks")
    if stored_as_bytes:
        check_blocks(cfg, n)
    if device.type == "cuda":
        import torch
        have, first = torch.cuda.device_count(), first_gpu(device)
        if first + n > have:
            raise PFError(f"tensor_parallel={n} from cuda:{first}: "
                          f"ranks need cuda:{first}..cuda:{first + n - 1} "
                          "(one GPU per rank, from the engine's own), "
                          f"this machine has {have} GPUs")
    elif n > (os.cpu_count() or 1):
        raise PFError(f"tensor_parallel={n}: "
                      f"more ranks than this machine's {os.cpu_count() or 1} CPU cores")
    return n


def first_gpu(device) -> int:
    """The GPU of rank 0 (the engine's device; ``cuda`` alone: the current one); rank r runs on
    cuda:(first_gpu + r) (worker.rank_device), so no two ranks share a GPU.  0 off CUDA."""
    import torch
    if device.type != "cuda":
        return 0
    return device.index if device.index is not None else torch.cuda.current_device()


def allreduce_kind(device) -> str:
    """nccl on CUDA; on the CPU ``PF_TP_ALLREDUCE`` (shm or gloo), else shm where csrc/cpu runs,
    else gloo."""
    from pf_engine.parallel.shm import shm_available
    if device.type == "cuda":
        return "nccl"
    want = os.environ.get("PF_TP_ALLREDUCE")
    if want is not None:
        if want not in ALLREDUCES["cpu"]:
            raise PFError(f"PF_TP_ALLREDUCE={want!r}: "
                          f"expected one of {', '.join(ALLREDUCES['cpu'])}")
        if want == "shm" and not shm_available():
            raise PFError("PF_TP_ALLREDUCE='shm' needs csrc/cpu built for this CPU "
                          "(pf_kernels.cpu_ops)")
        return want
    return "shm" if shm_available() else "gloo"


def head_kind() -> str:
    """``PF_TP_HEAD``: the LM head "sharded" by vocabulary (the default) or "replicated"."""
    want = os.environ.get("PF_TP_HEAD", "sharded")
    if want not in HEADS:
        raise PFError(f"PF_TP_HEAD={want!r}: expected one of {', '.join(HEADS)}")
    return want


@contextlib.contextmanager
def choices(allreduce: str | None = None, head: str | None = None):
    """PF_TP_ALLREDUCE / PF_TP_HEAD set while the block runs (engines built inside it use them;
    benchmarks and tests compare them in one process)."""
    env = {k: v for k, v in (("PF_TP_ALLREDUCE", allreduce), ("PF_TP_HEAD", head)) if v is not None}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
