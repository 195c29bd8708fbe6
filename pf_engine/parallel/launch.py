"""Tensor parallelism across hosts: ranks started by torch.distributed's own launcher.

    # on host A (rank 0: the engine's caller runs here)      # on host B
    torchrun --nnodes 2 --nproc-per-node 1 \\                  torchrun --nnodes 2 ... \\
      --rdzv-backend c10d --rdzv-endpoint A:29500 \\            --rdzv-endpoint A:29500 \\
      -m pf_engine.cli.generate --tensor-parallel 2 ...          -m pf_engine.cli.generate ...

Every rank runs the same command.  ``Engine.from_pretrained(tensor_parallel=N)`` sees torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: env:// as torch.distributed reads it)
and N must be WORLD_SIZE.  Rank 0 goes on as the engine; every other rank becomes a worker there
and then (``serve_as_worker``: it never returns to the command; the process exits when rank 0
closes the engine or is gone).  The ranks meet on a TCPStore at MASTER_ADDR:MASTER_PORT that rank
0 holds: rank 0's calls travel through it (channel.py), and the blocks' all-reduces through a
gloo (CPU) or nccl (CUDA) group on it.  The shared-memory all-reduce (shm.py) serves only the
ranks one engine spawns on its own host.  $PF_TP_HOST names the address a rank's gloo device
binds (default: the host's name), so ranks can sit on chosen interfaces (tests: 127.0.0.1 and
127.0.0.2).  Every host must see the model's files at the path rank 0 loaded them from.
"""
from __future__ import annotations

import datetime
import os
import sys

from pf_engine.errors import PFError

KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def torchrun_env() -> dict | None:
    """torchrun's rendezvous as this process sees it ({rank, world, addr, port}), or None when
    this process was not started by torchrun (or a launcher setting the same variables)."""
    if not all(k in os.environ for k in KEYS) or "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        return {"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
                "addr": os.environ["MASTER_ADDR"], "port": int(os.environ["MASTER_PORT"])}
    except ValueError:
        raise PFError("torchrun's RANK, WORLD_SIZE and MASTER_PORT must be integers, got "
                      + ", ".join(f"{k}={os.environ[k]!r}" for k in KEYS)) from None


def timeout_s() -> float:
    """How long a rank waits for the others: $PF_TP_TIMEOUT_S, else 60 s (runtime.tp_model's)."""
    return float(os.environ.get("PF_TP_TIMEOUT_S", 60))


def check_world(n: int, env: dict) -> None:
    if n != env["world"]:
        raise PFError(f"tensor_parallel={n} under torchrun: expected the launcher's WORLD_SIZE "
                      f"({env['world']}), one rank per process")


def store(env: dict, timeout_s: float):
    """The ranks' TCPStore at MASTER_ADDR:MASTER_PORT: torchrun's agent's own when it says so
    (TORCHELASTIC_USE_AGENT_STORE), else rank 0's."""
    import torch.distributed as dist
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return dist.TCPStore(env["addr"], env["port"], env["world"],
                         is_master=env["rank"] == 0 and not agent,
                         timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)


def gloo_group(st, rank: int, world: int, timeout_s: float):
    """A gloo group on ``st``, its device bound to $PF_TP_HOST when set."""
    import torch.distributed as dist
    timeout = datetime.timedelta(seconds=timeout_s)
    host = os.environ.get("PF_TP_HOST")
    if not host:
        return dist.ProcessGroupGloo(st, rank, world, timeout)
    opts = dist.ProcessGroupGloo._Options()
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    opts._timeout = timeout
    return dist.ProcessGroupGloo(st, rank, world, opts)


def serve_as_worker(n: int, env: dict, timeout_s: float) -> None:
    """Rank env["rank"] >= 1: join rank 0's store, take the engine's spec from its first
    message, build this rank's shard and run rank 0's calls; exit the process when done."""
    from pf_engine.parallel.channel import StoreChannel
    from pf_engine.parallel.worker import serve_calls
    check_world(n, env)
    st = store(env, timeout_s)
    chan = StoreChannel(st, env["rank"], n, timeout_s)
    code = serve_calls(env["rank"], n, chan, timeout_s, group=lambda spec: _group(
        st, env["rank"], n, timeout_s, spec))
    sys.stdout.flush()
    os._exit(code)


def _group(st, rank: int, n: int, timeout_s: float, spec: dict):
    if spec["device"] == "cuda":
        from pf_engine.parallel.group import make_group
        return make_group(rank, n, 0, timeout_s, "cuda", master=st)
    return gloo_group(st, rank, n, timeout_s)
