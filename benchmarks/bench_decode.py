"""The scheduler's decode step in each mode: dynamic shapes, static shapes, and CUDA graphs.

    python benchmarks/bench_decode.py                        # bundled model, CPU: dynamic, static
    python benchmarks/bench_decode.py --device cuda --dtype bf16 --model DIR   # + graphs

For each batch size B (--batches): B requests (personas cycling none / explicit top-2 / "auto" /
"token" with --personas mixed, or none) are admitted and prefilled, then --steps decode steps are
timed (median of --repeats runs of that many steps, after a warm-up step that also captures the
graphs).  ms/step per mode and B, and each mode against dynamic.  EOS is ignored.  Writes --out
(JSON with the machine and commit) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import pf_engine  # noqa: F401  (before torch: its OpenMP spin default, pf_engine/__init__.py)
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_serving import PROMPTS, TOP2  # noqa: E402
from benchmarks.common import (CpuWatch, busy_warning, command_line, default_out, machine_info,  # noqa: E402
                               no_prefix_cache, write_json)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_mode(eng, mode: str, B: int, personas: list, steps: int, repeats: int, device: str) -> float:
    from pf_engine.generation.sampling import SamplingParams
    sched = eng.new_scheduler(slots=B, max_len=512, prefill_budget=4096, background=False, decode=mode)
    budget = 2 + steps * (repeats + 1)
    reqs = [sched.submit(eng._encode([PROMPTS[i % len(PROMPTS)]], True)[0],
                         SamplingParams(max_new_tokens=budget), personas[i % len(personas)])
            for i in range(B)]
    sched.step()                       # admit + prefill + first decode
    sched.step()                       # warm-up (captures the graph)
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            sched.step()
        sync(device)
        times.append((time.perf_counter() - t) / steps)
    for r in reqs:
        r.cancel()
    sched.run()
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--personas", choices=["mixed", "none"], default="mixed")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=default_out("bench_decode.json"),
                    help="the JSON to write (default: bench_decode.json under $PF_BENCH_DIR or /tmp/pf-bench)")
    args = ap.parse_args(argv)
    try:
        batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        ap.error(f"--batches {args.batches!r}: expected comma-separated integers >= 1")
    if min(batches) < 1 or args.steps < 1 or args.repeats < 1:
        ap.error("--batches, --steps and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    from pf_engine import Engine
    from pf_engine.persona.bank import AdapterBank
    watch = CpuWatch()
    base = Engine.from_pretrained(args.model, device=args.device, dtype=args.dtype, progress=False)
    bank = AdapterBank.random(base.config, rank=16, seed=0, router=True)
    bank.router.top_k = 2
    eng = Engine.from_pretrained(base.folder, adapters=bank, device=args.device, dtype=args.dtype,
                                 backend=args.backend, progress=False)
    no_prefix_cache(eng).eos_ids = set()
    personas = [None, TOP2, "auto", "token"] if args.personas == "mixed" else [None]
    modes = ["dynamic", "static"] + (["graphs"] if args.device.startswith("cuda") else [])
    rows = []
    for B in batches:
        ms = {m: time_mode(eng, m, B, personas, args.steps, args.repeats, args.device) for m in modes}
        for m in modes:
            rows.append({"batch": B, "mode": m, "ms_per_step": ms[m], "vs_dynamic": ms[m] / ms["dynamic"]})
            print(f"  B={B} {m}: {ms[m]:.2f} ms/step", file=sys.stderr)
    result = {"benchmark": "bench_decode", "command": command_line("python benchmarks/bench_decode.py", argv),
              "machine": machine_info(), "device": args.device, "dtype": str(eng.dtype),
              "threads": args.threads, "backend": args.backend, "model": base.folder,
              "personas": args.personas, "steps": args.steps, "repeats": args.repeats,
              "other_cpu_cores": watch.other_cores(), "busy": busy_warning(watch.other_cores()),
              "rows": rows}
    write_json(args.out, result)
    print(markdown(result))
    print(f"\nwrote {args.out}")
    return 0


def markdown(result: dict) -> str:
    dev = result["machine"].get("gpu") or result["machine"]["cpu"]
    lines = [f"{dev}, {result['device']}, {result['dtype']}, backend {result['backend']}, personas "
             f"{result['personas']}, median of {result['repeats']} x {result['steps']} steps", "",
             "| batch | mode | ms/step | vs dynamic |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['batch']} | {r['mode']} | {r['ms_per_step']:.2f} | {r['vs_dynamic']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
