"""End-to-end prefill and decode of two checkouts of this engine, interleaved in one run: did a
change make them slower?

    python benchmarks/bench_ab.py --old /path/to/old/checkout            # this checkout is "new"
    python benchmarks/bench_ab.py --old ../old --configs base,top2:cpu --rounds 5 --new-tokens 32
    python benchmarks/bench_ab.py --old ../old --quantize file,f32   # the bundled Q4_1 and fp32

Each measurement is one row of the checkout's own benchmarks/bench_generate.py (its ``--row``
child: load, two warm-up calls, a 1-token and an N-token generate, EOS ignored; decode ms/token =
(t_N - t_1) / (N - 1)), run in a fresh process whose imports resolve to that checkout's packages
(its folder first on PYTHONPATH; a checkout from before the kernels/ -> pf_kernels/ rename gets a
``pf_kernels`` link to its ``kernels/``).  Each checkout needs its native modules built in place
(``python csrc/cpu/build.py`` there).  Order: for each round, for each configuration, both
checkouts, the first of the pair alternating between rounds, so that drift falls on both alike.

    ms(side, config) = median over rounds;   ratio(config) = ms(new) / ms(old)   (< 1: faster)
    prefill(side, config) = median tok/s;    prefill_ratio = prefill(new) / prefill(old) (> 1: faster)

A configuration is a persona config (base, top2, dense; ":backend" optional) under each weight
format of --quantize (bench_generate.py's: file = a GGUF's own formats, f32, q8, q4).

Writes --out (JSON: both commits, every measurement, the medians and ratios) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import CpuWatch, busy_warning, command_line, default_out, machine_info, write_json  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def git(checkout: str, *args) -> str | None:
    proc = subprocess.run(["git", *args], cwd=checkout, capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else None


def import_path(checkout: str, scratch: str) -> str:
    """PYTHONPATH that makes ``checkout``'s pf_engine and pf_kernels the ones imported."""
    paths = [checkout]
    if not os.path.isdir(os.path.join(checkout, "pf_kernels")) and \
            os.path.isdir(os.path.join(checkout, "kernels")):
        link_dir = os.path.join(scratch, f"shim-{abs(hash(checkout))}")
        os.makedirs(link_dir, exist_ok=True)
        link = os.path.join(link_dir, "pf_kernels")
        if not os.path.exists(link):
            os.symlink(os.path.join(checkout, "kernels"), link)
        paths.insert(0, link_dir)
    return os.pathsep.join(paths)


def measure(checkout: str, spec: dict, args, scratch: str) -> dict:
    out = os.path.join(scratch, "row.json")
    cmd = [sys.executable, os.path.join(checkout, "benchmarks", "bench_generate.py"),
           "--threads", str(args.threads), "--new-tokens", str(args.new_tokens), "--repeats", "1",
           "--quantize", spec["quantize"],
           "--row", json.dumps({k: v for k, v in spec.items() if k != "quantize"}), "--out", out] \
        + (["--model", args.model] if args.model else [])
    env = dict(os.environ, PYTHONPATH=import_path(checkout, scratch))
    try:
        proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True,
                              timeout=args.row_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.row_timeout:g} s"}
    if proc.returncode != 0 or not os.path.exists(out):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {tail[:200]}"}
    with open(out) as f:
        row = json.load(f)
    os.unlink(out)
    return row


def specs(configs: str, quantize: str = "f32") -> list[dict]:
    out = []
    for q in quantize.split(","):
        for item in configs.split(","):
            name, _, backend = item.strip().partition(":")
            out.append({"engine": "pf_engine", "config": name, "backend": backend or "-",
                        "batch": 1, "quantize": q.strip()})
    return out


def label(s: dict) -> str:
    return f"{s['config']}{':' + s['backend'] if s['backend'] != '-' else ''} {s['quantize']}"


def markdown(res: dict) -> str:
    lines = [f"old = {res['old']['commit']} ({res['old']['path']}), new = {res['new']['commit']}; "
             f"{res['rounds']} rounds, {res['new_tokens']} new tokens, {res['threads']} threads", "",
             "| config | weights | old ms/token | new ms/token | new / old | old prefill tok/s "
             "| new prefill tok/s | new / old |", "|---|---|---|---|---|---|---|---|"]
    for s in res["summary"]:
        def f(v, p):
            return "-" if v is None else format(v, p)
        lines.append(f"| {s['config']}{':' + s['backend'] if s['backend'] != '-' else ''} | "
                     f"{s['quantize']} | {f(s['old_ms'], '.1f')} | {f(s['new_ms'], '.1f')} | "
                     f"{f(s['ratio'], '.3f')} | {f(s['old_prefill'], '.0f')} | "
                     f"{f(s['new_prefill'], '.0f')} | {f(s['prefill_ratio'], '.3f')} |")
    if res.get("busy"):
        lines += ["", f"Warning: {res['busy']}."]
    return "\n".join(lines)


def run(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="bench_ab", description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="the other checkout (its folder)")
    ap.add_argument("--new", default=os.path.dirname(HERE), help="default: this checkout")
    ap.add_argument("--configs", default="base,top2:cpu,dense:cpu")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--quantize", default="f32",
                    help="weight formats, comma-separated (bench_generate.py's --quantize)")
    ap.add_argument("--row-timeout", type=float, default=600.0)
    ap.add_argument("--out", default=default_out("bench_ab.json"))
    args = ap.parse_args(argv)
    sides = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    for name, path in sides.items():
        if not os.path.isfile(os.path.join(path, "benchmarks", "bench_generate.py")):
            ap.error(f"--{name} {path}: not a checkout of this engine (no benchmarks/bench_generate.py)")
    if args.rounds < 1 or args.new_tokens < 2:
        ap.error("--rounds must be >= 1 and --new-tokens >= 2")
    watch, rows = CpuWatch(), []
    res = {"benchmark": "bench_ab", "command": command_line("python benchmarks/bench_ab.py", argv),
           "machine": machine_info(), "rounds": args.rounds, "new_tokens": args.new_tokens,
           "threads": args.threads, "model": args.model, "quantize": args.quantize,
           **{k: {"path": p, "commit": git(p, "rev-parse", "--short", "HEAD"),
                  "dirty": bool(git(p, "status", "--porcelain", "--untracked-files=no"))}
              for k, p in sides.items()}, "measurements": rows}
    with tempfile.TemporaryDirectory() as scratch:
        for rnd in range(args.rounds):
            for spec in specs(args.configs, args.quantize):
                for side in (("old", "new") if rnd % 2 == 0 else ("new", "old")):
                    row = measure(sides[side], spec, args, scratch)
                    rows.append({**spec, "side": side, "round": rnd, **row})
                    print(f"round {rnd} {label(spec)} {side}: "
                          f"{row.get('decode_ms_per_token', row.get('error'))}", file=sys.stderr)
                    write_json(args.out, {**res, "complete": False})
    summary = []
    for spec in specs(args.configs, args.quantize):
        mine = [r for r in rows if "error" not in r and all(r[k] == spec[k] for k in spec)]
        ms = {s: [r["decode_ms_per_token"] for r in mine if r["side"] == s] for s in sides}
        pre = {s: [r["prefill_tok_s"] for r in mine if r["side"] == s] for s in sides}
        med = {s: statistics.median(v) if v else None for s, v in ms.items()}
        pmed = {s: statistics.median(v) if v else None for s, v in pre.items()}
        summary.append({**spec, "old_ms": med["old"], "new_ms": med["new"], "old_all": ms["old"],
                        "new_all": ms["new"],
                        "ratio": med["new"] / med["old"] if med["new"] and med["old"] else None,
                        "old_prefill": pmed["old"], "new_prefill": pmed["new"],
                        "prefill_ratio": pmed["new"] / pmed["old"]
                        if pmed["new"] and pmed["old"] else None})
    res.update(summary=summary, complete=True, other_cpu_cores=watch.other_cores(),
               busy=busy_warning(watch.other_cores()))
    write_json(args.out, res)
    print(markdown(res))
    print(f"\nwrote {args.out}")
    return res


if __name__ == "__main__":
    run()
