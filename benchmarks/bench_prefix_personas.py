"""One system prompt, many personas (issue 37): the prefix cache off, keyed by the persona in
every layer, and split at the bank's first adapted layer (runtime/prefix_cache.py), with "auto"
routed by a pass of its own or from the prefill's lower layers (runtime/routing.py), on the same
request streams, in one run.

    python benchmarks/bench_prefix_personas.py --out benchmarks/results/bench_prefix_personas.json
    python benchmarks/bench_prefix_personas.py --requests 12 --rounds 1      # a quick look

The bundled SmolLM2-135M-Instruct (its default 4-bit weights) with the bigfive bank: chat
requests made of one of bench_prefix.py's three ~300-token system prompts and a short user
turn, the persona of each drawn independently of its system prompt (uniformly: none, "auto", or
one explicit pole of the ten), arriving open-loop at --rate requests/s (seeded exponential gaps),
--new-tokens each, through the engine's background scheduler; and the same stream with "auto" on
every request.  Per round each stream runs the modes in turn (a fresh cache each), the first mode
rotating between rounds:

    off          no prefix cache
    persona      every layer keyed by the persona (the cache before issue 37)
    split-pass   the split cache, "auto" routed by a pass of its own over the prompt's first
                 layers at admission (before routing from the prefill)
    split        the split cache, "auto" routed from its prefill's lower layers (the default)

Greedy replies are compared with the cache-off run's: equal in off, persona and split (the
default routing); split-pass's "auto" gates come from a whole-prompt forward instead of the
prefill's chunks, equal only to rounding, so some of its replies part ways (counted, not a goal).

    TTFT p50 (time to first token, median over requests; then median over rounds)
    ratio off / split  (goal >= 2)      ratio persona-keyed / split  (goal >= 1.5)

and, per mode, the prompt tokens reused (of them from the shared layers), TTFT p50 by persona
kind, throughput; the greedy replies of each mode are compared (equal: the cache changes no token).
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import pf_engine  # noqa: F401  (before torch: its OpenMP spin default)
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_prefix import QUESTIONS, SYSTEMS  # noqa: E402
from benchmarks.common import (command_line, default_out, goals_table,  # noqa: E402
                               machine_info, run_main)

MODES = ("off", "persona", "split-pass", "split")
STREAMS = ("mixed", "auto")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--rate", type=float, default=0.6, help="arrivals per second")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=default_out("bench_prefix_personas.json"))
    return ap


def stream_specs(eng, n: int, seed: int, stream: str = "mixed") -> list[tuple[list[int], object]]:
    """n (prompt ids, persona): a system prompt and a user turn, and independently of them none,
    "auto" or one explicit pole at weight 1 ("mixed"), or "auto" always ("auto")."""
    rng = random.Random(seed)
    choices = ([None, "auto"] + [{name: 1.0} for name in eng.bank.expert_names]
               if stream == "mixed" else ["auto"])
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": rng.choice(SYSTEMS)},
                {"role": "user", "content": rng.choice(QUESTIONS)}]
        out.append((eng.tokenizer.encode(eng.tokenizer.render(msgs)), rng.choice(choices)))
    return out


def kind(p) -> str:
    return "base" if p is None else "auto" if p == "auto" else "explicit"


def run_stream(eng, specs, gaps, new_tokens: int, mode: str) -> dict:
    from pf_engine.generation.sampling import SamplingParams
    from pf_engine.runtime.prefix_cache import PrefixCache
    sched = eng.new_scheduler(slots=4, max_len=512)
    sched.prefix = (None if mode == "off"
                    else PrefixCache.for_engine(eng, 1.0, shared=mode != "persona"))
    if mode == "split-pass":
        sched.two_phase = None                   # "auto": the router's own pass at admission
    reqs, t0 = [], time.perf_counter()
    for (ids, persona), gap in zip(specs, gaps):
        time.sleep(gap)
        reqs.append(sched.submit(ids, SamplingParams(max_new_tokens=new_tokens), persona))
    for r in reqs:
        r.result()
    wall = time.perf_counter() - t0
    ttft = [r.t_first - r.t_submit for r in reqs]
    by_kind: dict[str, list] = {}
    for t, (_, p) in zip(ttft, specs):
        by_kind.setdefault(kind(p), []).append(t)
    return {"mode": mode, "ttft_p50_s": statistics.median(ttft),
            "ttft_p50_by_kind_s": {k: statistics.median(v) for k, v in by_kind.items()},
            "throughput_tok_s": sum(len(r.tokens) for r in reqs) / wall, "wall_s": wall,
            "prompt_tokens": sum(len(r.ids) for r in reqs),
            "cached_tokens": sum(r.cached_tokens for r in reqs),
            "shared_cached_tokens": sum(r.shared_cached_tokens for r in reqs),
            "replies": [r.result().token_ids for r in reqs]}


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from pf_engine import Engine
    from pf_engine.runtime.prefix_cache import route_layer, split_layer
    torch.set_num_threads(args.threads)
    eng = Engine.from_pretrained(adapters="bigfive", progress=False)
    rng = random.Random(args.seed + 1)
    gaps = [0.0] + [rng.expovariate(args.rate) for _ in range(args.requests - 1)]
    run_stream(eng, stream_specs(eng, 2, args.seed), [0, 0], 2, "split")      # warm-up
    out = {}
    for name in STREAMS:
        specs = stream_specs(eng, args.requests, args.seed, name)
        rows = []
        for rnd in range(args.rounds):
            k = rnd % len(MODES)
            for mode in MODES[k:] + MODES[:k]:
                rows.append(dict(run_stream(eng, specs, gaps, args.new_tokens, mode), round=rnd))
                print(f"{name} round {rnd + 1}/{args.rounds} {mode}: TTFT p50 "
                      f"{rows[-1]['ttft_p50_s']:.2f} s", file=sys.stderr)
        out[name] = summary(rows)
    return {"benchmark": "bench_prefix_personas",
            "command": command_line("benchmarks/bench_prefix_personas.py",
                                    sys.argv[1:] if argv is None else argv),
            "machine": machine_info(), "threads": args.threads, "requests": args.requests,
            "rate": args.rate, "new_tokens": args.new_tokens, "weights": eng.weight_formats,
            "split_layer": split_layer(eng), "route_layer": route_layer(eng),
            **out["mixed"], "auto": out["auto"]}


def summary(rows: list[dict]) -> dict:
    """One stream's rows -> medians over rounds per mode, the ratios, whether replies agree."""
    med = {m: {"ttft_p50_s": statistics.median(r["ttft_p50_s"] for r in rows if r["mode"] == m),
               "throughput_tok_s": statistics.median(r["throughput_tok_s"] for r in rows
                                                     if r["mode"] == m),
               "ttft_p50_by_kind_s": {k: statistics.median(r["ttft_p50_by_kind_s"][k] for r in rows
                                                           if r["mode"] == m)
                                      for k in rows[0]["ttft_p50_by_kind_s"]}}
           for m in MODES}
    ref = next(r["replies"] for r in rows if r["mode"] == "off")
    same = all(r["replies"] == ref for r in rows if r["mode"] != "split-pass")
    pass_differ = max(sum(a != b for a, b in zip(r["replies"], ref))
                      for r in rows if r["mode"] == "split-pass")
    for r in rows:
        del r["replies"]
    split = med["split"]["ttft_p50_s"]
    return {"rows": rows, "median": med, "replies_equal": same, "pass_replies_differ": pass_differ,
            "off_over_split": med["off"]["ttft_p50_s"] / split,
            "persona_over_split": med["persona"]["ttft_p50_s"] / split,
            "pass_over_split": med["split-pass"]["ttft_p50_s"] / split}


def goals(res: dict) -> list[tuple[str, str, bool]]:
    auto = res.get("auto")
    out = [("TTFT p50 >= 2x lower with the cache than without", f"{res['off_over_split']:.2f}x",
            res["off_over_split"] >= 2),
           ("TTFT p50 >= 1.5x lower than the persona-keyed cache",
            f"{res['persona_over_split']:.2f}x", res["persona_over_split"] >= 1.5),
           ("greedy replies equal with the cache and without", str(res["replies_equal"]),
            res["replies_equal"])]
    if auto:
        hit = _first(auto, "split")
        out += [("auto requests hit (auto on every request)",
                 f"{hit['cached_tokens']} of {hit['prompt_tokens']} prompt tokens reused",
                 hit["cached_tokens"] > 0),
                ("greedy replies equal with the cache and without (auto on every request)",
                 str(auto["replies_equal"]), auto["replies_equal"])]
    return out


def _first(stream: dict, mode: str) -> dict:
    return next(r for r in stream["rows"] if r["round"] == 0 and r["mode"] == mode)


def _table(stream: dict) -> list[str]:
    m = stream["median"]
    kinds = sorted(m["split"]["ttft_p50_by_kind_s"])
    lines = ["| prefix cache | TTFT p50 s | " + " | ".join(f"{k} p50 s" for k in kinds)
             + " | throughput tok/s | prompt tokens reused (shared layers only) |",
             "|---" * (len(kinds) + 4) + "|"]
    for mode in (x for x in MODES if x in m):
        first = _first(stream, mode)
        lines.append(f"| {mode} | {m[mode]['ttft_p50_s']:.2f} | "
                     + " | ".join(f"{m[mode]['ttft_p50_by_kind_s'][k]:.2f}" for k in kinds)
                     + f" | {m[mode]['throughput_tok_s']:.1f} | {first['cached_tokens']} of "
                     f"{first['prompt_tokens']} ({first['shared_cached_tokens']}) |")
    return lines


def markdown(res: dict) -> str:
    lines = [f"{res['machine']['cpu']}, {res['threads']} threads, {res['weights']}; {res['requests']} "
             f"requests at {res['rate']} req/s on three system prompts; split at layer "
             f"{res['split_layer']}, the router reading layer {res.get('route_layer')}; medians "
             "over rounds, tokens reused in the first round", "",
             "The persona of each request drawn independently of its system prompt:", ""]
    lines += _table(res)
    if res.get("auto"):
        a = res["auto"]
        lines += ["", "\"auto\" on every request (TTFT p50 off / split "
                  f"{a['off_over_split']:.2f}x, persona-keyed / split {a['persona_over_split']:.2f}x, "
                  f"router's own pass / split {a['pass_over_split']:.2f}x; with the router's own "
                  f"pass {a['pass_replies_differ']} of {res['requests']} replies part ways from "
                  "the cache-off run's, its gates equal to rounding only):", ""] + _table(a)
    lines += [""] + goals_table(goals(res), 37)
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_main(run, goals, build_parser().parse_args(argv).out, argv)


if __name__ == "__main__":
    sys.exit(main())
