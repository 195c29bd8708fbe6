"""What ``deterministic=True`` costs on fp32 weights (issue 36): the same engine with its fp32
products the cpu kernel's at every batch size (batch-invariant greedy tokens) against torch's
GEMMs for batches above MAX_ROWS rows, interleaved in one process.

    python benchmarks/bench_deterministic.py --out benchmarks/results/bench_deterministic.json
    python benchmarks/bench_deterministic.py --rounds 3 --new-tokens 16 --configs base

Workloads (bench_generate.py's timing: a 1-token and an N-token generate, EOS ignored, prefix
cache off): ``long`` one prompt of --prompt-tokens tokens; ``batch4`` bench_generate's four chat
prompts at once.  For each round, each configuration and workload, both modes, the first
alternating between rounds.

    prefill tok/s = prompt tokens / t_1;   decode ms/token = (t_N - t_1) / (N - 1)
    ratio = deterministic / default (median over rounds; prefill < 1 and decode > 1: a cost)

A model stored as bytes (the bundled 4-bit file, q8, 16-bit) is batch-invariant in both modes:
its products are the kernel's at any size, so only fp32 is measured here.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_generate import PROMPTS, TOP2, median_time  # noqa: E402
from benchmarks.common import command_line, default_out, machine_info, no_prefix_cache, write_json  # noqa: E402

TEXT = ("The committee reviewed the proposal in detail and raised several questions about the "
        "budget, the schedule, the staffing plan and the risks it had not yet considered. ")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--configs", default="base,top2", help="base, top2 (bigfive experts)")
    p.add_argument("--out", default=None)
    return p


def workloads(eng, prompt_tokens: int) -> dict[str, list[list[int]]]:
    long = eng.tokenizer.encode(TEXT * (prompt_tokens // 20 + 1), chat=False)[:prompt_tokens]
    return {"long": [long], "batch4": [eng.tokenizer.encode(p, chat=True) for p in PROMPTS]}


def timing(eng, ids, persona, n: int) -> dict:
    def gen(k):
        outs = eng.generate(ids, max_new_tokens=k, persona=[persona] * len(ids))
        assert all(len(o.token_ids) == k for o in outs)
    t1 = median_time(lambda: gen(1), 1, eng.device, warmup=1)
    tn = median_time(lambda: gen(n), 1, eng.device, warmup=0)
    return {"prefill_tok_s": sum(map(len, ids)) / t1, "decode_ms_per_token": 1e3 * (tn - t1) / (n - 1)}


def markdown(res: dict) -> str:
    lines = [f"{res['machine']['cpu']}, {res['weights']}; {res['rounds']} rounds, "
             f"{res['new_tokens']} new tokens", "",
             "| persona | workload | prompt tokens | prefill tok/s default | deterministic | ratio "
             "| decode ms/token default | deterministic | ratio |", "|---" * 9 + "|"]
    for r in res["rows"]:
        d, x = r["default"], r["deterministic"]
        lines.append(f"| {r['config']} | {r['workload']} | {r['prompt_tokens']} | "
                     f"{d['prefill_tok_s']:.0f} | {x['prefill_tok_s']:.0f} | {r['prefill_ratio']:.3f} | "
                     f"{d['decode_ms_per_token']:.1f} | {x['decode_ms_per_token']:.1f} | "
                     f"{r['decode_ratio']:.3f} |")
    return "\n".join(lines)


def run(argv=None) -> dict:
    from pf_engine import Engine
    args = build_parser().parse_args(argv)
    eng = no_prefix_cache(Engine.from_pretrained(adapters="bigfive", quantize="f32", progress=False))
    eng.eos_ids = set()
    personas = {"base": None, "top2": TOP2}
    configs = [c for c in args.configs.split(",") if c]
    work = workloads(eng, args.prompt_tokens)
    samples: dict[str, list] = {}
    for r in range(args.rounds):
        for c in configs:
            for w, ids in work.items():
                for det in ((False, True) if r % 2 == 0 else (True, False)):
                    eng.backend.deterministic = det
                    key = f"{c}/{w}/{'deterministic' if det else 'default'}"
                    samples.setdefault(key, []).append(timing(eng, ids, personas[c], args.new_tokens))
                    print(key, samples[key][-1], file=sys.stderr, flush=True)
    rows = []
    for c in configs:
        for w, ids in work.items():
            med = {m: {f: statistics.median(s[f] for s in samples[f"{c}/{w}/{m}"])
                       for f in ("prefill_tok_s", "decode_ms_per_token")}
                   for m in ("default", "deterministic")}
            rows.append({"config": c, "workload": w, "prompt_tokens": sum(map(len, ids)), **med,
                         "prefill_ratio": med["deterministic"]["prefill_tok_s"] / med["default"]["prefill_tok_s"],
                         "decode_ratio": med["deterministic"]["decode_ms_per_token"]
                         / med["default"]["decode_ms_per_token"]})
    res = {"benchmark": "bench_deterministic", "command": command_line("benchmarks/bench_deterministic.py",
                                                                      sys.argv[1:] if argv is None else argv),
           "machine": machine_info(), "weights": eng.weight_formats, "rounds": args.rounds,
           "new_tokens": args.new_tokens, "rows": rows, "samples": samples}
    write_json(args.out or default_out("bench_deterministic.json"), res)
    for row in rows:
        print(f"{row['config']:5} {row['workload']:7} prefill x{row['prefill_ratio']:.3f} "
              f"decode x{row['decode_ratio']:.3f}")
    return res


if __name__ == "__main__":
    run()
