"""A stream of requests with Poisson arrivals and mixed personas: continuous batching against static
batching, on the bundled model.

    python benchmarks/bench_serving.py                      # 24 requests at 0.5, 1, 2 req/s
    python benchmarks/bench_serving.py --requests 8 --rates 4 --model DIR --out results/x.json

The stream (seeded): arrival gaps ~ Exp(1 / rate); each request takes one of the prompts below,
max_new_tokens uniform in [--min-new, --max-new] (EOS ignored, so every request makes exactly
that many), and a persona cycling through none, an explicit top-2 mix and "auto" (the bank's
sequence router; a seeded random bank of ten rank-16 experts).  The same stream runs through:

    continuous      Engine.submit at each arrival; the scheduler admits between decode steps
    static          what generate() alone gives: when the engine is free, every request that has
                    arrived goes into one generate() call, and later arrivals wait for it to end
    continuous-base the continuous run with every persona dropped (the base model): the persona
                    mix's cost is throughput(base) / throughput(mixed)
    continuous-naive  the continuous run with the naive mixing backend

Each rate runs continuous and static; the highest rate (the most loaded) also runs continuous-base
and continuous-naive.  Per run: throughput = generated tokens / (last completion - first
arrival); engine busy = the engine's compute time / that span (near 1: the machine is saturated and
throughput is bounded by compute, not by scheduling); time to first token
(TTFT) = first token - arrival; time per output token (TPOT) = (completion - first token) /
(tokens - 1); p50 and p99 of both.  Static batches cannot report a request's first token before
the call returns, so their TTFT is the batch start + its prefill time (engine.stats).
Step bound (per rate): static's decode steps (each batch runs to its longest request) over
generated tokens / slots, the fewest steps a continuous run could take: once both runs are
saturated and a step costs about the same whatever its batch size, continuous batching gains at
most this over static.  With lengths uniform in [8, 40] and full batches of 8 it is about
E[max of 8] / E[length] = 36.4 / 24 = 1.5.
The engines use the default backend (``cpu`` on a CPU with csrc/cpu built, else ``torch``).
Writes --out (JSON with the machine and commit) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import pf_engine  # noqa: F401  (before torch: its OpenMP spin default, pf_engine/__init__.py)
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (CpuWatch, busy_warning, command_line, default_out, machine_info,  # noqa: E402
                               no_prefix_cache, write_json)

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "I failed my driving test again and I feel like giving up.",
    "My parcel was supposed to arrive on Monday and it still has not shown up.",
    "Plan a weekend trip to the mountains for two friends who like photography.",
    "Explain how a refrigerator keeps food cold, for a ten year old.",
    "Give me three ideas for a birthday party on a small budget.",
]
TOP2 = {"extraversion+": 0.6, "agreeableness+": 0.4}


def make_stream(n: int, rate: float, lo: int, hi: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        out.append({"arrival": t, "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_new": rng.randint(lo, hi), "persona": [None, TOP2, "auto"][i % 3]})
        t += rng.expovariate(rate)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summary(name: str, rate: float, recs: list[dict], t0: float, busy: float) -> dict:
    """recs: arrival, first, done (absolute), tokens; busy: compute seconds -> the run's figures."""
    ttft = [r["first"] - r["arrival"] for r in recs]
    tpot = [(r["done"] - r["first"]) / (r["tokens"] - 1) for r in recs if r["tokens"] > 1]
    span = max(r["done"] for r in recs) - t0
    return {"run": name, "rate": rate, "requests": len(recs), "tokens": sum(r["tokens"] for r in recs),
            "seconds": span, "engine_busy": busy / span, "throughput_tok_s": sum(r["tokens"] for r in recs) / span,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": pct(ttft, 0.99),
            "tpot_p50_s": statistics.median(tpot) if tpot else None,
            "tpot_p99_s": pct(tpot, 0.99) if tpot else None}


def run_continuous(eng, stream: list[dict], slots: int, budget: int, drop_personas: bool = False):
    eng.new_scheduler(slots=slots, prefill_budget=budget)   # a fresh one: empty pool, background thread
    t0 = time.perf_counter()
    reqs = []
    for s in stream:
        wait = t0 + s["arrival"] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        reqs.append((t0 + s["arrival"], eng.submit(s["prompt"], max_new_tokens=s["max_new"], chat=True,
                                                   persona=None if drop_personas else s["persona"])))
    recs = []
    for arrival, r in reqs:
        out = r.result()
        recs.append({"arrival": arrival, "first": r.t_first, "done": r.t_done,
                     "tokens": len(out.token_ids)})
    st = eng.scheduler().stats
    return recs, t0, st.prefill_s + st.decode_s


def run_static(eng, stream: list[dict], slots: int) -> list[dict]:
    """generate() alone: each call takes every request arrived by then (up to ``slots``).
    Also returns its decode steps (each batch runs to its longest request)."""
    t0 = time.perf_counter()
    recs, i, busy, steps = [], 0, 0.0, 0
    while i < len(stream):
        now = time.perf_counter() - t0
        if stream[i]["arrival"] > now:
            time.sleep(stream[i]["arrival"] - now)
            now = time.perf_counter() - t0
        batch = [s for s in stream[i:i + slots] if s["arrival"] <= now]
        i += len(batch)
        steps += max(s["max_new"] for s in batch)       # decode steps: the batch's longest
        start = time.perf_counter()
        # one max_new_tokens per call: the batch runs to its longest request, each keeps its own
        outs = eng.generate([s["prompt"] for s in batch], max_new_tokens=max(s["max_new"] for s in batch),
                            chat=True, persona=[s["persona"] for s in batch])
        end = time.perf_counter()
        busy += end - start
        first = start + eng.stats.prefill_s
        for s, o in zip(batch, outs):
            n = s["max_new"]        # the request's own budget; tokens past it are not counted
            # its last token came at the decode step that made it (steps take equal time here)
            step = (end - first) / max(1, len(o.token_ids) - 1)
            recs.append({"arrival": t0 + s["arrival"], "first": first,
                         "done": first + step * (n - 1), "tokens": n})
    return recs, t0, busy, steps


def goals(runs: list[dict], slots: int) -> list[dict]:
    """Per rate: continuous / static throughput (goal >= 2) and its step bound, static /
    continuous p99 TTFT (goal >= 3); at the rate with a base run, base / mixed throughput
    (goal <= 1.3)."""
    out = []
    for rate in sorted({r["rate"] for r in runs}):
        by = {r["run"]: r for r in runs if r["rate"] == rate}
        g = {"rate": rate,
             "throughput_ratio": by["continuous"]["throughput_tok_s"] / by["static"]["throughput_tok_s"],
             "ttft_p99_ratio": by["static"]["ttft_p99_s"] / by["continuous"]["ttft_p99_s"]}
        if "decode_steps" in by["static"]:
            # static's decode steps over the fewest a continuous run could take (every slot
            # busy): the most continuous batching can gain once both are saturated, when a
            # step costs about the same whatever its batch size
            g["step_bound"] = by["static"]["decode_steps"] / (by["static"]["tokens"] / slots)
        if "continuous-base" in by:
            g["persona_cost"] = by["continuous-base"]["throughput_tok_s"] / by["continuous"]["throughput_tok_s"]
        out.append(g)
    return out


def header(result: dict, load: str) -> list[str]:
    """The machine and the stream in one line (``load``: how requests arrive), and the warning
    of a busy machine; bench_http.py's tables open the same way."""
    lines = [f"{result['machine']['cpu']}, {result['threads']} threads, {result['device']}, "
             f"{load}, {result['slots']} slots, {result['min_new']}-{result['max_new']} new tokens", ""]
    if result.get("busy"):
        lines += [f"**Warning: {result['busy']}.**", ""]
    return lines


def markdown(result: dict) -> str:
    lines = header(result, f"{result['requests']} requests per rate (Poisson arrivals), prefill "
                           f"budget {result['prefill_budget']} tokens/step")
    lines += ["| req/s | run | tokens/s | engine busy | TTFT p50 s | TTFT p99 s | TPOT p50 ms | TPOT p99 ms |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['rate']:g} | {r['run']} | {r['throughput_tok_s']:.1f} | {r['engine_busy']:.2f} | "
                     f"{r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | {1e3 * r['tpot_p50_s']:.0f} | "
                     f"{1e3 * r['tpot_p99_s']:.0f} |")
    bound = any("step_bound" in g for g in result["goals"])
    lines += ["", "| req/s | continuous / static throughput (goal >= 2) |" + (" step bound |" if bound else "")
              + " static / continuous p99 TTFT (goal >= 3) | base / mixed throughput (goal <= 1.3) |",
              "|---|---|" + ("---|" if bound else "") + "---|---|"]
    for g in result["goals"]:
        cost = f"{g['persona_cost']:.2f}x" if "persona_cost" in g else "-"
        sb = (f" {g['step_bound']:.2f}x |" if "step_bound" in g else " - |") if bound else ""
        lines.append(f"| {g['rate']:g} | {g['throughput_ratio']:.2f}x |{sb} {g['ttft_p99_ratio']:.2f}x | {cost} |")
    return "\n".join(lines)


def stream_flags(ap: argparse.ArgumentParser, out_name: str) -> None:
    """The flags of a stream benchmark (this one and bench_http.py): model, machine, stream."""
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--min-new", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=40)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=default_out(out_name),
                    help=f"the JSON to write (default: {out_name} under $PF_BENCH_DIR or /tmp/pf-bench)")


def stream_engines(args, backends: list) -> tuple:
    """(base engine, {backend: engine with the stream's bank}): a seeded random bank of ten
    rank-16 experts whose sequence router picks two; EOS ignored, one warm-up generate each."""
    from pf_engine import Engine
    from pf_engine.persona.bank import AdapterBank
    torch.set_num_threads(args.threads)
    base = Engine.from_pretrained(args.model, device=args.device, progress=False)
    bank = AdapterBank.random(base.config, rank=16, seed=0, router=True)
    bank.router.top_k = 2
    engines = {b: Engine.from_pretrained(base.folder, adapters=bank, device=args.device, backend=b,
                                         progress=False) for b in backends}
    for e in engines.values():
        no_prefix_cache(e).eos_ids = set()
        e.generate(PROMPTS[0], max_new_tokens=2, chat=True)                  # warm-up
    return base, engines


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    stream_flags(ap, "bench_serving.json")
    ap.add_argument("--rates", default="0.5,1,2", help="mean arrivals per second, comma-separated")
    ap.add_argument("--prefill-budget", type=int, default=128, help="prompt tokens per scheduler step")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive-backend run")
    args = ap.parse_args(argv)
    try:
        rates = sorted(float(r) for r in args.rates.split(","))
    except ValueError:
        ap.error(f"--rates {args.rates!r}: expected comma-separated numbers > 0")
    if not rates or min(rates) <= 0:
        ap.error(f"--rates {args.rates!r}: expected comma-separated numbers > 0")
    watch = CpuWatch()
    base, engines = stream_engines(args, ["auto"] + ([] if args.no_naive else ["naive"]))
    eng = engines["auto"]
    runs = []
    for rate in rates:
        stream = make_stream(args.requests, rate, args.min_new, args.max_new, args.seed)
        kinds = [("continuous", eng, False), ("static", eng, False)]
        if rate == rates[-1]:
            kinds += [("continuous-base", eng, True)] + (
                [] if args.no_naive else [("continuous-naive", engines["naive"], False)])
        for name, e, drop in kinds:
            if name == "static":
                recs, t0, busy, steps = run_static(e, stream, args.slots)
            else:
                recs, t0, busy = run_continuous(e, stream, args.slots, args.prefill_budget, drop)
            runs.append(summary(name, rate, recs, t0, busy))
            if name == "static":
                runs[-1]["decode_steps"] = steps
            print(f"  {rate:g} req/s {name}: {runs[-1]['throughput_tok_s']:.1f} tok/s, "
                  f"engine busy {runs[-1]['engine_busy']:.2f}", file=sys.stderr)
    result = {"benchmark": "bench_serving", "command": command_line("python benchmarks/bench_serving.py", argv),
              "machine": machine_info(), "device": args.device, "threads": args.threads,
              "model": base.folder, "requests": args.requests, "rates": rates, "slots": args.slots,
              "prefill_budget": args.prefill_budget,
              "min_new": args.min_new, "max_new": args.max_new, "seed": args.seed,
              "other_cpu_cores": watch.other_cores(), "busy": busy_warning(watch.other_cores()),
              "runs": runs, "goals": goals(runs, args.slots)}
    write_json(args.out, result)
    print(markdown(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
