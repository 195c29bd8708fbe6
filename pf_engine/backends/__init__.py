"""The mixing backends, and the one place that chooses one.

Every backend computes the same function for each adapted linear (model/linear.py):

    y = x W^T + b + sum_k g[t,k] s_k B_k A_k x

| name   | module           | where                       | how                                 |
|--------|------------------|-----------------------------|-------------------------------------|
| cpu    | cpu/             | CPU, AVX2/FMA, csrc/cpu     | fused C++ pass per group for decode |
|        |                  | built                       | rows, a block's decode step in C++  |
| torch  | torch_backend.py | anywhere                    | two GEMMs per layer whatever K is   |
|        |                  |                             | (the grouped product, grouped.py)   |
| naive  | naive.py         | anywhere                    | the loop over experts: the baseline |
| triton | kernels.py       | GPU; CPU, TRITON_INTERPRET  | pf_kernels' fused Triton kernels    |
| cuda   | kernels.py       | GPU, csrc/cuda built        | the nvcc-built decode kernel        |

``resolve_backend(name, device)`` is called once when an engine is built and returns the
backend object (backends/base.py) that its model runs on.  ``auto`` picks ``cpu`` on a CPU where
csrc/cpu is built and runs, else ``torch`` (on a GPU too: the benchmarks in benchmarks/RESULTS.md
say which is fastest where).  The environment variable ``PF_BACKEND`` (read there, once per
engine) replaces ``auto``.
"""
from __future__ import annotations

import os

import torch

from pf_engine.backends.base import Backend
from pf_engine.errors import PFError

BACKENDS = ("torch", "naive", "triton", "cuda", "cpu")


def backend_status(name: str, device: torch.device) -> tuple[bool, str]:
    """(usable, why not) for a backend on ``device``."""
    if name in ("torch", "naive"):
        return True, ""
    if name == "triton":
        try:
            import pf_kernels
        except ImportError as e:
            return False, f"pf_kernels cannot be imported ({e})"
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return False, "no GPU (on CPU tensors triton runs only with TRITON_INTERPRET=1)"
        return pf_kernels.available()
    if name == "cpu":
        if device.type != "cpu":
            return False, f"the cpu backend runs on CPU tensors, not {device.type}"
        from pf_kernels import cpu_ops
        return cpu_ops.cpu_available()
    if name == "cuda":
        if device.type != "cuda":
            return False, "no GPU: the cuda backend needs device='cuda'"
        from pf_kernels import cuda_ops
        return cuda_ops.cuda_available()
    return False, f"unknown backend; expected one of auto, {', '.join(BACKENDS)}"


def check_name(name) -> str | None:
    """``name`` as given (None for auto), or a PFError naming the choices: what a CLI checks
    before it loads anything."""
    if name is None or name == "auto":
        return None
    if name not in BACKENDS:
        raise PFError(f"backend={name!r}: unknown backend; expected one of auto, "
                      f"{', '.join(BACKENDS)}")
    return name


def resolve_backend(name: str | None, device: torch.device,
                    expert_format: str | None = None, deterministic: bool = False) -> Backend:
    """The backend object for ``name`` on ``device``: auto (or None) -> $PF_BACKEND if set,
    else cpu where csrc/cpu runs on a CPU, else torch; a named backend must be usable.
    ``expert_format``: the persona experts' format on the cpu backend (cpu/experts.py; None:
    auto), refused in one line where it cannot run.  ``deterministic``: every product batch-
    invariant (cpu backend only: its fp32 products the kernel's at any batch size)."""
    from pf_engine.backends.cpu import experts
    experts.check(expert_format)
    name = check_name(name) or check_name(os.environ.get("PF_BACKEND") or None)
    if name is None:
        name = "cpu" if device.type == "cpu" and backend_status("cpu", device)[0] else "torch"
    ok, why = backend_status(name, device)
    if not ok:
        raise PFError(f"backend={name!r} is not available: {why}")
    if deterministic and name != "cpu":
        raise PFError(f"deterministic=True: batch-invariant products run on the cpu backend only, "
                      f"expected backend='cpu' (got {name!r})")
    return create(name, device, experts.check(expert_format, name), deterministic)


def create(name: str, device: torch.device, expert_format: str | None = None,
           deterministic: bool = False) -> Backend:
    """A backend object by name, unchecked (tests and benchmarks that checked it themselves);
    ``expert_format`` and ``deterministic`` reach the cpu backend (others keep their experts as
    attached and their GEMMs)."""
    from pf_engine.backends.cpu import Cpu
    from pf_engine.backends.torch_backend import Torch
    from pf_engine.backends.kernels import Kernels
    from pf_engine.backends.naive import Naive
    device = torch.device(device)
    if name in ("triton", "cuda"):
        return Kernels(device, name)
    classes = {"cpu": Cpu, "torch": Torch, "naive": Naive}
    if name not in classes:
        raise PFError(f"backend={name!r}: expected one of {', '.join(BACKENDS)}")
    return Cpu(device, expert_format, deterministic) if name == "cpu" else classes[name](device)
