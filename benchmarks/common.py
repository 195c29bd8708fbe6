"""Helpers every benchmark shares: the machine's description, its copy bandwidth, JSON output."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time

import torch


def copy_bandwidth(mbytes: int = 256, repeats: int = 10) -> float:
    """STREAM-style copy bandwidth in bytes/s: (bytes read + bytes written) / time, best of N."""
    a = torch.empty(mbytes * 2**20 // 4).uniform_()
    b = torch.empty_like(a)
    b.copy_(a)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.numel() * 4 / best


def read_bandwidth(device: torch.device | str = "cpu", mbytes: int = 256, repeats: int = 10) -> float:
    """Read bandwidth in bytes/s: a sum over ``mbytes`` of fp32 (reads only, as a decode step's
    weights), best of N; on CUDA a 1 GiB tensor timed with device events.  Torch's threads as set."""
    device = torch.device(device)
    if device.type == "cuda":
        mbytes = max(mbytes, 1024)
    a = torch.empty(mbytes * 2**20 // 4, device=device).uniform_()
    a.sum()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a.sum()
            e.record()
            torch.cuda.synchronize()
            best = min(best, s.elapsed_time(e) / 1e3)
        else:
            t = time.perf_counter()
            a.sum()
            best = min(best, time.perf_counter() - t)
    return a.numel() * 4 / best


def busy_warning(load_before: float, load_after: float, cores: int | None = None) -> str | None:
    """A one-line warning when the 1-minute load average before the run shows other work on the
    cores (above half of them): the timings may then be inflated.  None otherwise."""
    cores = cores or os.cpu_count() or 1
    if load_before <= 0.5 * cores:
        return None
    return (f"machine busy: 1-minute load average {load_before:.2f} before the run ({load_after:.2f} "
            f"after) on {cores} cores; timings may be inflated")


def _git(*args) -> str | None:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        proc = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5)
        return proc.stdout if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit() -> str | None:
    out = _git("rev-parse", "--short", "HEAD")
    return out.strip() or None if out is not None else None


def git_dirty() -> list[str] | None:
    """Tracked files changed since the commit (results folders aside): the code that made a
    result is that commit only when this is empty.  None when git cannot tell."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    if out is None:
        return None
    files = [line[3:] for line in out.splitlines() if line[3:]]
    return [f for f in files if not f.startswith("benchmarks/results/")]


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "commit": git_commit(), "dirty": git_dirty(), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
