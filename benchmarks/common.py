"""Helpers every benchmark shares: the machine's description, its copy bandwidth, JSON output."""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import time

import pf_engine  # noqa: F401  (before torch: its OpenMP spin default, pf_engine/__init__.py)
import torch

from pf_engine.train.provenance import cpu_name



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


def _cpu_ticks() -> tuple[float, float] | None:
    """(busy ticks of all cores, ticks of this process and its waited-for children), or None."""
    try:
        with open("/proc/stat") as f:
            vals = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(vals) - vals[3] - (vals[4] if len(vals) > 4 else 0.0)      # minus idle, iowait
    t = os.times()
    own = (t.user + t.system + t.children_user + t.children_system) * os.sysconf("SC_CLK_TCK")
    return busy, own


class CpuWatch:
    """How much of the cores other processes used while a benchmark ran.

    /proc/stat's busy time of all cores minus this process's own (and its finished children's)
    CPU time, over the wall time: ``other_cores()`` is the average number of cores kept busy by
    someone else (0 on an idle machine, whatever the benchmark itself does)."""

    def __init__(self):
        self.t0, self.c0 = time.perf_counter(), _cpu_ticks()

    def other_cores(self) -> float | None:
        c1 = _cpu_ticks()
        if self.c0 is None or c1 is None:
            return None
        wall = time.perf_counter() - self.t0
        ticks = (c1[0] - self.c0[0]) - (c1[1] - self.c0[1])
        return max(0.0, ticks / os.sysconf("SC_CLK_TCK") / max(wall, 1e-9))


def busy_warning(other_cores: float | None, cores: int | None = None) -> str | None:
    """A one-line warning when other processes kept more than a quarter of a core busy on
    average during the run (CpuWatch): the timings may then be inflated.  None otherwise."""
    cores = cores or os.cpu_count() or 1
    if other_cores is None or other_cores <= 0.25:
        return None
    return (f"machine busy: other processes kept {other_cores:.2f} of {cores} cores busy on average "
            "during the run; timings may be inflated")


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
    """Tracked files changed since the commit (results and markdown aside): the code that made a
    result is that commit only when this is empty.  None when git cannot tell."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    if out is None:
        return None
    files = [line[3:] for line in out.splitlines() if line[3:]]
    # results and prose (the harness itself rewrites README.md) cannot change a figure
    return [f for f in files if not f.startswith("benchmarks/results/") and not f.endswith(".md")]


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


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(REPO, "benchmarks", "results")       # committed: written only when asked


def default_out(name: str) -> str:
    """Where a benchmark writes its JSON unless --out says otherwise: $PF_BENCH_DIR, else
    <tmp>/pf-bench/.  The committed benchmarks/results/ is written only when asked (an explicit
    --out, or ``python -m benchmarks --readme``)."""
    import tempfile
    return os.path.join(os.environ.get("PF_BENCH_DIR") or os.path.join(tempfile.gettempdir(), "pf-bench"),
                        name)


def command_line(script: str, argv: list[str]) -> str:
    """The command a result was made by, as one would type it at the repository's root: absolute
    paths inside the repository are written relative to it."""
    def rel(a: str) -> str:
        if os.path.isabs(a) and os.path.abspath(a).startswith(REPO + os.sep):
            return os.path.relpath(a, REPO)
        return a
    return " ".join([script] + [shlex.quote(rel(a)) for a in argv])


def write_json(path: str, obj: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def goals_table(goals: list[tuple[str, str, bool]], issue: int) -> list[str]:
    """A benchmark's goals, (goal, this run's figure, met), as the rows of its markdown table."""
    return ([f"| goal (issue {issue}) | this run | |", "|---|---|---|"]
            + [f"| {g} | {fig} | {'met' if ok else '**missed**'} |" for g, fig, ok in goals])


def run_main(run, goals, out: str, argv=None) -> int:
    """A goal benchmark's main: run it, write its JSON to ``out``, print each goal's line."""
    res = run(argv)
    write_json(out, res)
    for g, fig, ok in goals(res):
        print(f"{g}: {fig} ({'met' if ok else 'missed'})")
    return 0


def no_prefix_cache(eng):
    """``eng`` with its prefix cache off: timing benchmarks repeat one prompt, whose KV the cache
    would serve from the second time on (bench_prefix.py measures the cache, on against off)."""
    eng.set_prefix_cache(0)
    return eng
