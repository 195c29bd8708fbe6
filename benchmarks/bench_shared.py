"""Decode on a shared machine: how much slower beside busy processes, and against transformers.

    python benchmarks/bench_shared.py                   # bundled model, 2 threads, 24 new tokens, 3 rounds
    python benchmarks/bench_shared.py --no-peers        # pf_engine rows only
    python benchmarks/bench_shared.py --configs base,top2:cpu --repeats 5 --row-timeout 600

Question: on a small machine that other processes also use, how much slower does the engine
decode than on the same machine when it is quiet, and is that slowdown smaller than transformers'
own, in the same run?  (On 2 cores the engine's thread pool in csrc/cpu once spun at barriers
waiting for descheduled threads: 0.5 tok/s instead of ~20 beside one busy process.)

Rows (``--configs``, bench_generate's NAME[:BACKEND] syntax; default ``base,top2:cpu,dense:cpu``
at batch 1) and the peer, transformers' ``generate`` on the base model (``--no-peers`` drops it).
Every measurement is one row of benchmarks/bench_generate.py run in a fresh process of its own
(its ``--row`` child: load, two warm-up calls, then ``--inner-repeats`` (default 1) timed
1-token and N-token generates, their medians, EOS ignored), so rows never share a process, started
in its own session and killed with its process group after ``--row-timeout`` seconds.

Conditions, each made right before a measurement and undone right after it (every busy process
is a pure-Python ``while True: pass`` in a session of its own, killed with its process group in a
``finally``, Ctrl-C and SIGTERM included; the JSON records their pids, sessions, nice values and
CPU seconds, and checks at the end that none is left):

    quiet      no busy process
    two-nice   two busy processes, each ``setsid`` + ``nice -n 19``
    one-busy   one busy process at normal priority (this benchmark's own nice)

Order: for each round (``--repeats``), for each row, for each condition: quiet, two-nice, one-busy;
so a row's quiet and busy measurements alternate and the machine's drift falls on all alike.

Figures.  For one measurement, bench_generate's rule: decode ms/token = (t_N - t_1) / (N - 1)
with t_1 a 1-token generate (prefill + one sample) and t_N an N-token generate.  Per row r and
condition c: ms(r, c) = median over the rounds' measurements (errors left out), and

    ratio(r, c) = ms(r, c) / ms(r, quiet)            (1.0 = no slowdown)

(none where either median is missing or not positive: t_N - t_1 < 0 is timing noise, seen on
tiny models only.)

Goals, for every pf_engine row:

    ratio(r, two-nice) <= 2.5
    ratio(r, one-busy) <= 3.0
    ratio(r, c) <= ratio(transformers, c)  for c in two-nice, one-busy   ("better than the peer")

Why these limits: with /proc/sys/kernel/sched_autogroup_enabled = 1 (recorded in the JSON) every
session is one scheduling group of equal weight, and nice only ranks a process inside its own
session, so a ``setsid nice -n 19`` loop weighs as much as a normal one.  A decode that runs at
speed 1 on one core and s (1 < s <= 2) on two, and that yields the CPU when it waits, then gets one
core beside one busy session (ratio ~ s <= 2) and a third of the machine, 2/3 of a core, beside
two (ratio ~ 1.5 s, 2.5 for s = 1.67); the goals leave that much room.  A pool that spins at its
barriers for a descheduled thread loses whole time slices per step and misses them by far.
Without autogroup the nice-19 loops cost little and the goals are easy: the table warns.
Each measurement also records ``other_cores``: the cores kept busy by processes that are not this
benchmark's (common.CpuWatch), which inflate every condition alike.

JSON (``--out``, rewritten after every measurement with ``complete`` false until the end):
machine (common.machine_info: cpu, cores, torch, commit, dirty, ...), command, model, threads,
new_tokens, repeats, inner_repeats, row_timeout_s, sched_autogroup_enabled, conditions, goal_limits,
rows; measurements (one per round, row and condition: bench_generate's row figures or an error,
busy [{pid, sid, nice, cpu_s}], wall_s, other_cores); summary (per row, per condition: n,
ms_per_token, ratio; the goals of pf_engine rows: goal, ratio, limit or peer_ratio, met);
all_goals_met; busy_pids and busy_left_running (empty: no busy process outlived the run);
other_cores_mean, busy and quiet_not_quiet (common.busy_warning over all, and over quiet, measurements).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_generate  # noqa: E402
from benchmarks.common import CpuWatch, busy_warning, command_line, default_out, machine_info, write_json  # noqa: E402

CONDITIONS = ("quiet", "two-nice", "one-busy")
BUSY_NICE = {"quiet": (), "two-nice": (19, 19), "one-busy": (0,)}    # nice of each busy process
GOALS = {"two-nice": 2.5, "one-busy": 3.0}                          # max ratio busy / quiet
DEFAULT_CONFIGS = "base,top2:cpu,dense:cpu"
BUSY_LOOP = "while True: pass"
PEER = "transformers"


# Busy processes --------------------------------------------------------------------------------
@contextlib.contextmanager
def deferred_interrupts():
    """SIGINT and SIGTERM arriving inside the block raise KeyboardInterrupt at its end, not in
    the middle: a child being started is bound first (so its owner's ``finally`` kills it), and a
    kill being made is finished.  (An interrupt inside Popen would orphan the child it forked.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got = []
    old = {s: signal.signal(s, lambda n, f: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            raise KeyboardInterrupt


def start_busy(nices, into: list) -> list[subprocess.Popen]:
    """One pure-Python busy loop per nice value, each the leader of a new session (setsid),
    appended to ``into`` as soon as it exists (the caller's ``finally`` stops them)."""
    for n in nices:
        with deferred_interrupts():
            into.append(subprocess.Popen(
                [sys.executable, "-c", BUSY_LOOP], stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=(lambda n=n: os.nice(n)) if n else None))
    return into


def stop_busy(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each busy process's group (its pid: it leads its session), then reap it.  The
    leader is not reaped before its group is killed, so its pid cannot have been reused."""
    for p in procs:
        if p.returncode is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait()


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:           # the group id now belongs to someone else's processes
        return True


def proc_info(pid: int) -> dict:
    """pid, session, nice and CPU seconds so far, from /proc/<pid>/stat (what is readable)."""
    out = {"pid": pid}
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()     # fields[k - 3] is stat field k
        tick = os.sysconf("SC_CLK_TCK")
        out.update(sid=int(fields[3]), nice=int(fields[16]),
                   cpu_s=(int(fields[11]) + int(fields[12])) / tick)
    except (OSError, IndexError, ValueError):
        pass
    return out


# One measurement -------------------------------------------------------------------------------
def measure_row(child_argv: list[str], spec: dict, timeout: float) -> dict:
    """bench_generate's row child (``--row SPEC``) in a new session: its figures, or {"error"}.
    Killed with its process group after ``timeout`` seconds, or when this process is interrupted.
    (bench_generate.run_isolated has no time limit, hence this launcher of the same child.)"""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "row.json"), os.path.join(tmp, "stderr")
        cmd = [sys.executable, os.path.abspath(bench_generate.__file__), *child_argv,
               "--row", json.dumps(spec), "--out", out]
        with open(err, "w") as ferr:
            proc = None
            try:
                with deferred_interrupts():
                    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=ferr, start_new_session=True)
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return {"error": f"timed out after {timeout:g} s (--row-timeout); killed"}
            finally:
                with deferred_interrupts():
                    if proc is not None and proc.poll() is None:   # timed out or interrupted
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
        if rc != 0 or not os.path.exists(out):
            with open(err) as f:
                tail = (f.read().strip().splitlines() or ["no output"])[-1]
            return {"error": f"row process failed (exit {rc}): {tail[:200]}"}
        with open(out) as f:
            return json.load(f)


def measure(child_argv: list[str], spec: dict, condition: str, timeout: float) -> dict:
    """One row under one condition: busy processes started, the row measured, the busy
    processes killed (always) and described."""
    watch, t0 = CpuWatch(), time.perf_counter()
    busy: list[subprocess.Popen] = []
    try:
        start_busy(BUSY_NICE[condition], busy)
        row = measure_row(child_argv, spec, timeout)
    finally:
        with deferred_interrupts():
            info = [proc_info(p.pid) for p in busy]
            stop_busy(busy)
    return {"condition": condition, **row, "busy": info, "wall_s": time.perf_counter() - t0,
            "other_cores": watch.other_cores()}


# Figures ---------------------------------------------------------------------------------------
def key(spec: dict) -> tuple:
    return spec["engine"], spec["config"], spec["backend"], spec["batch"]


def label(spec: dict) -> str:
    s = f"{spec['engine']} {spec['config']}" + (f":{spec['backend']}" if spec["backend"] != "-" else "")
    return s + (f" B={spec['batch']}" if spec["batch"] != 1 else "")


def summarise(rows: list[dict], measurements: list[dict]) -> list[dict]:
    """Per row: each condition's median ms/token over its measurements, and its ratio to quiet;
    then the goals for the pf_engine rows (see the module docstring)."""
    out = []
    for spec in rows:
        ms = {c: [m["decode_ms_per_token"] for m in measurements if key(m) == key(spec)
                  and m["condition"] == c and "error" not in m] for c in CONDITIONS}
        s = {**spec, "label": label(spec)}
        for c in CONDITIONS:
            s[c] = {"n": len(ms[c]), "ms_per_token": statistics.median(ms[c]) if ms[c] else None}
        quiet = s["quiet"]["ms_per_token"]
        for c in CONDITIONS[1:]:
            busy = s[c]["ms_per_token"]
            s[c]["ratio"] = busy / quiet if busy and busy > 0 and quiet and quiet > 0 else None
        out.append(s)
    peer = next((s for s in out if s["engine"] == PEER and s["config"] == "base"), None)
    for s in out:
        if s["engine"] == "pf_engine":
            s["goals"] = goals(s, peer)
    return out


def goals(s: dict, peer: dict | None) -> list[dict]:
    """The goals of one pf_engine row: met is True/False, or None where a figure is missing."""
    out = []
    for c, limit in GOALS.items():                 # the limits first, then the peer, as in the table
        r = s[c]["ratio"]
        out.append({"goal": f"{c} <= {limit:g}x quiet", "condition": c, "limit": limit, "ratio": r,
                    "met": None if r is None else r <= limit})
    for c in GOALS:
        r, p = s[c]["ratio"], peer[c]["ratio"] if peer else None
        out.append({"goal": f"{c} <= {PEER}", "condition": c, "peer_ratio": p, "ratio": r,
                    "met": None if r is None or p is None else r <= p})
    return out


def all_met(summary: list[dict]) -> bool | None:
    """True when every goal of every pf_engine row is met, False when one is missed, None when
    none is missed but some could not be evaluated (a failed row, no peer)."""
    met = [g["met"] for s in summary for g in s.get("goals", [])]
    return False if False in met else (None if None in met or not met else True)


def autogroup() -> int | None:
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


# The run ---------------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message):                      # one line, not usage + error
        raise SystemExit(f"bench_shared: {message}")


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled model)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS,
                    help=f"pf_engine rows, NAME[:BACKEND] comma-separated (default {DEFAULT_CONFIGS})")
    ap.add_argument("--no-peers", action="store_true", help=f"drop the {PEER} row")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--quantize", default="f32", choices=("f32", "q8", "q4", "file"),
                    help="pf_engine's weights (bench_generate's --quantize; file: the bundled Q4_1)")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over every row and condition")
    ap.add_argument("--inner-repeats", type=int, default=1,
                    help="timed pairs (t_1, t_N) per measurement, their medians (bench_generate --repeats)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--row-timeout", type=float, default=300.0,
                    help="seconds one measurement (a row process) may take before it is killed")
    ap.add_argument("--out", default=default_out("bench_shared.json"),
                    help="the JSON to write (default: bench_shared.json under $PF_BENCH_DIR or /tmp/pf-bench)")
    return ap


def parse(argv: list[str]) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    for flag, value, least in (("--new-tokens", args.new_tokens, 2), ("--repeats", args.repeats, 1),
                               ("--inner-repeats", args.inner_repeats, 1), ("--threads", args.threads, 1)):
        if value < least:
            raise SystemExit(f"bench_shared: {flag} must be at least {least}, got {value}")
    if not args.row_timeout > 0:
        raise SystemExit(f"bench_shared: --row-timeout must be positive, got {args.row_timeout:g}")
    if args.model is not None and not os.path.isdir(args.model):
        raise SystemExit(f"bench_shared: --model {args.model!r} is not a folder")
    from pf_engine.backends import BACKENDS
    for item in args.configs.split(","):
        backend = item.strip().partition(":")[2]
        if backend and backend not in BACKENDS:
            raise SystemExit(f"bench_shared: --configs: unknown backend {backend!r} in {item.strip()!r}; "
                             f"expected one of {', '.join(BACKENDS)}")
    return args


def row_specs(args, child_argv: list[str]) -> list[dict]:
    """bench_generate's rows for these configurations at batch 1, and its transformers row."""
    gargs = bench_generate.build_parser().parse_args(child_argv + ["--configs", args.configs])
    try:
        specs = bench_generate.row_specs(gargs)
    except SystemExit as e:                       # bench_generate's unknown-configuration line
        raise SystemExit(f"bench_shared: --configs: {e}") from None
    return [s for s in specs if s["engine"] == "pf_engine" or (s["engine"] == PEER and not args.no_peers)]


def run(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    child_argv = ["--device", "cpu", "--threads", str(args.threads), "--new-tokens",
                  str(args.new_tokens), "--repeats", str(args.inner_repeats), "--batches", "1"]
    if args.model:
        child_argv += ["--model", os.path.abspath(args.model)]
    child_argv += ["--quantize", args.quantize]
    rows = row_specs(args, child_argv)
    head = {"benchmark": "bench_shared",
            "question": "how much slower does decode get beside busy processes, against the same "
                        f"engine on a quiet machine, and against {PEER}'s own slowdown",
            "command": command_line("python benchmarks/bench_shared.py", argv),
            "machine": machine_info(), "model": args.model or "bundled", "device": "cpu",
            "threads": args.threads, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "inner_repeats": args.inner_repeats,
            "row_timeout_s": args.row_timeout, "sched_autogroup_enabled": autogroup(),
            "conditions": {"quiet": "no busy process",
                           "two-nice": "two busy processes, each setsid + nice -n 19",
                           "one-busy": "one busy process, own session, normal priority"},
            "busy_loop": BUSY_LOOP, "goal_limits": GOALS, "row_child_argv": child_argv,
            "rows": rows}
    measurements: list[dict] = []
    total = args.repeats * len(rows) * len(CONDITIONS)
    for rnd in range(args.repeats):
        for spec in rows:
            for cond in CONDITIONS:
                m = {"round": rnd, **spec, **measure(child_argv, spec, cond, args.row_timeout)}
                measurements.append(m)
                write_json(args.out, {**head, "complete": False, "measurements": measurements})
                fig = (f"{m['decode_ms_per_token']:.2f} ms/token" if "error" not in m else m["error"])
                print(f"  [{len(measurements)}/{total}] round {rnd + 1} {label(spec):28s} {cond:9s} {fig}",
                      file=sys.stderr)
    pids = [b["pid"] for m in measurements for b in m["busy"]]
    left = [p for p in pids if group_alive(p)]
    others = [m["other_cores"] for m in measurements if m["other_cores"] is not None]
    quiet = [m["other_cores"] for m in measurements if m["other_cores"] is not None
             and m["condition"] == "quiet"]
    summary = summarise(rows, measurements)
    result = {**head, "complete": True, "measurements": measurements, "summary": summary,
              "all_goals_met": all_met(summary), "busy_pids": pids, "busy_left_running": left,
              "other_cores_mean": statistics.fmean(others) if others else None,
              "busy": busy_warning(statistics.fmean(others)) if others else None,
              "quiet_not_quiet": busy_warning(statistics.fmean(quiet)) if quiet else None}
    write_json(args.out, result)
    print(markdown(result))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return result


def markdown(result: dict) -> str:
    m = result["machine"]
    dirty = " (dirty)" if m.get("dirty") else ""
    lines = [f"{m['cpu']}, {m['cores']} cores, {result['threads']} threads, {result['new_tokens']} new "
             f"tokens, median of {result['repeats']} rounds, conditions interleaved; "
             f"sched_autogroup_enabled={result['sched_autogroup_enabled']}; "
             f"commit {m.get('commit')}{dirty}", ""]
    if result["sched_autogroup_enabled"] != 1:
        lines += ["**Warning: autogroup is off (or unknown): nice 19 then really lowers the busy "
                  "processes, and the goals, which assume a fair share per session, are easier.**", ""]
    if result.get("quiet_not_quiet"):
        lines += [f"**Warning: the quiet baseline was not quiet: {result['quiet_not_quiet']}.**", ""]
    elif result.get("busy"):
        lines += [f"**Warning: {result['busy']}.**", ""]
    if result.get("busy_left_running"):
        lines += [f"**Warning: busy processes left running: {result['busy_left_running']}.**", ""]
    lim = result["goal_limits"]
    lines += [f"| row | quiet ms/token | two-nice ms/token | two-nice ratio | one-busy ms/token | one-busy "
              f"ratio | two-nice <= {lim['two-nice']:g}x | one-busy <= {lim['one-busy']:g}x "
              f"| two-nice <= {PEER} | one-busy <= {PEER} |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    num = lambda v, fmt: "-" if v is None else fmt % v  # noqa: E731
    cell = lambda g: ("n/a" if g["met"] is None else "met" if g["met"] else "**missed**") + (  # noqa: E731
        f" ({num(g['ratio'], '%.2fx')} vs {num(g['peer_ratio'], '%.2fx')})" if "peer_ratio" in g else "")
    for s in result["summary"]:
        cols = [s["label"], num(s["quiet"]["ms_per_token"], "%.2f")]
        for c in CONDITIONS[1:]:
            cols += [num(s[c]["ms_per_token"], "%.2f"), num(s[c]["ratio"], "%.2fx")]
        cols += [cell(g) for g in s["goals"]] if "goals" in s else ["(peer)"] * 4
        lines.append("| " + " | ".join(cols) + " |")
    lines += ["", "ratio = median busy ms/token / median quiet ms/token of the same row; "
              "ms/token = (t_N - t_1) / (N - 1); all goals met: "
              + {True: "yes", False: "no", None: "not all evaluated"}[result["all_goals_met"]]]
    return "\n".join(lines)


def _sigterm(signum, frame):
    raise KeyboardInterrupt                        # so that every finally kills what it started


def main(argv=None) -> int:
    try:
        before = signal.signal(signal.SIGTERM, _sigterm)
    except ValueError:                              # not the main thread
        before = None
    try:
        run(argv)
    except KeyboardInterrupt:
        print("bench_shared: interrupted; busy processes killed, partial JSON kept", file=sys.stderr)
        return 130
    finally:
        if before is not None:
            signal.signal(signal.SIGTERM, before)
    return 0


if __name__ == "__main__":
    sys.exit(main())
