"""Prompt scoring throughput: what lm-evaluation-harness asks of a server (echo + logprobs,
several prompts per request, no decode), over HTTP against in process and against transformers.

    python benchmarks/bench_scoring.py                    # 48 prompts of 32-160 tokens, bundled model
    python benchmarks/bench_scoring.py --prompts 8 --repeats 1 --out /tmp/s.json   # quick

Rows, on the same prompts (random token ids, seeded), same threads, interleaved, median of
``--repeats``:
  transformers   AutoModelForCausalLM forward, right-padded batches of --batch with an attention
                 mask, log_softmax and gather (what ``lm_eval --model hf`` does);
  Engine.logits  one prompt per forward (it takes equal-length rows), log_softmax and gather;
  Engine.score   batched (generation/scoring.py: padded chunks, no KV cache);
  http           pf-serve on 127.0.0.1, POST /v1/completions with --batch token-id prompts per
                 request, echo, logprobs 1, max_tokens 0, one request at a time (httpx).
Reports prompts/s and prompt tokens/s per row and its ratio to transformers, and the largest
|logprob difference| of each row from transformers' (fp32 throughout).
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

from benchmarks.common import CpuWatch, busy_warning, command_line, machine_info, write_json  # noqa: E402

MID = "bench"
ROWS = ("transformers", "Engine.logits", "Engine.score", "http")


def make_prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lens]


def hf_scores(model, prompts: list[list[int]], batch: int) -> list[list[float]]:
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        T = max(len(p) for p in chunk)
        ids = torch.tensor([p + [0] * (T - len(p)) for p in chunk])
        mask = torch.tensor([[1] * len(p) + [0] * (T - len(p)) for p in chunk])
        with torch.inference_mode():
            lp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        for b, p in enumerate(chunk):
            nxt = torch.tensor(p[1:])
            out.append(lp[b, :len(p) - 1].gather(1, nxt[:, None])[:, 0].tolist())
    return out


def logits_scores(eng, prompts: list[list[int]]) -> list[list[float]]:
    out = []
    for p in prompts:
        lp = torch.log_softmax(eng.logits([p])[0], -1)
        out.append(lp[:-1].gather(1, torch.tensor(p[1:])[:, None])[:, 0].tolist())
    return out


def score_scores(eng, prompts: list[list[int]]) -> list[list[float]]:
    return [[e.logprob for e in rows[1:]] for rows in eng.score(prompts)]


def http_scores(url: str, prompts: list[list[int]], batch: int) -> list[list[float]]:
    import httpx
    out = []
    with httpx.Client(timeout=600) as c:
        for i in range(0, len(prompts), batch):
            r = c.post(url + "/v1/completions", json={
                "model": MID, "prompt": prompts[i:i + batch], "echo": True, "logprobs": 1,
                "max_tokens": 0, "temperature": 0})
            r.raise_for_status()
            for ch in sorted(r.json()["choices"], key=lambda c: c["index"]):
                out.append(ch["logprobs"]["token_logprobs"][1:])
    return out


def max_diff(a: list[list[float]], b: list[list[float]]) -> float:
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled model)")
    ap.add_argument("--prompts", type=int, default=48)
    ap.add_argument("--min-len", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=160)
    ap.add_argument("--batch", type=int, default=8, help="prompts per forward / per request")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "results", "bench_scoring.json"))
    args = ap.parse_args(argv)
    if min(args.prompts, args.batch, args.repeats, args.min_len - 1) < 1 or \
            args.max_len < args.min_len:
        ap.error("--prompts, --batch, --repeats >= 1 and 2 <= --min-len <= --max-len expected")
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from pf_engine import Engine
    from pf_engine.engine import resolve_model
    from pf_engine.serve import build_app
    from pf_engine.serve.threaded import ThreadedServer
    watch = CpuWatch()
    folder = resolve_model(args.model, True)
    eng = Engine.from_pretrained(folder, device="cpu", dtype="fp32", progress=False)
    eng.new_scheduler(slots=2, max_len=64)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = make_prompts(args.prompts, args.min_len, args.max_len, eng.config.vocab_size,
                           args.seed)
    tokens = sum(len(p) for p in prompts)
    times = {r: [] for r in ROWS}
    scores = {}
    with ThreadedServer(build_app(eng, MID, max_queue=4)) as srv:
        run = {"transformers": lambda: hf_scores(hf, prompts, args.batch),
               "Engine.logits": lambda: logits_scores(eng, prompts),
               "Engine.score": lambda: score_scores(eng, prompts),
               "http": lambda: http_scores(srv.url, prompts, args.batch)}
        for name in ROWS:                                             # warm up once each
            scores[name] = run[name]()
        for rep in range(args.repeats):
            for name in ROWS:
                t = time.perf_counter()
                run[name]()
                times[name].append(time.perf_counter() - t)
            print(f"  repeat {rep + 1}/{args.repeats}: " + ", ".join(
                f"{n} {times[n][-1]:.2f} s" for n in ROWS), file=sys.stderr)
    med = {n: statistics.median(times[n]) for n in ROWS}
    rows = [{"row": n, "seconds": med[n], "prompts_per_s": args.prompts / med[n],
             "tokens_per_s": tokens / med[n], "vs_transformers": med["transformers"] / med[n],
             "max_abs_logprob_diff_vs_transformers": max_diff(scores[n], scores["transformers"]),
             "all_seconds": times[n]} for n in ROWS]
    result = {"benchmark": "bench_scoring",
              "command": command_line("python benchmarks/bench_scoring.py", argv),
              "machine": machine_info(), "threads": args.threads, "model": folder,
              "prompts": args.prompts, "prompt_tokens": tokens, "min_len": args.min_len,
              "max_len": args.max_len, "batch": args.batch, "repeats": args.repeats,
              "seed": args.seed, "other_cpu_cores": watch.other_cores(),
              "busy": busy_warning(watch.other_cores()), "rows": rows}
    write_json(args.out, result)
    print(markdown(result))
    print(f"\nwrote {args.out}")
    return 0


def markdown(result: dict) -> str:
    lines = [f"Scoring {result['prompts']} prompts ({result['prompt_tokens']} tokens, "
             f"{result['min_len']}-{result['max_len']} each), batches of {result['batch']}, "
             f"{result['threads']} threads, median of {result['repeats']}:", "",
             "| row | prompts/s | tokens/s | x transformers | max abs logprob diff |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['prompts_per_s']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['vs_transformers']:.2f} | "
                     f"{r['max_abs_logprob_diff_vs_transformers']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
