"""Prefill and decode tokens/s of PersonaFuse Engine against transformers' generate, in one run.

    python benchmarks/bench_generate.py                  # bundled SmolLM2-135M, fp32, 2 threads
    python benchmarks/bench_generate.py --model DIR --threads 4 --new-tokens 128

Both engines load the same HF folder, get the same prompt, decode greedily for exactly N tokens
and use the same thread count.  Each is timed the same way: ``t1`` = a generate of 1 token (the
prefill plus one sample), ``tN`` = a generate of N tokens; prefill tok/s = prompt / t1 and decode
tok/s = (N - 1) / (tN - t1).  Medians over --repeats after a warm-up.  The floor is the weight
bytes each decode step must read over this machine's measured copy bandwidth.
Writes benchmarks/results/bench_generate.json (or --out) and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import copy_bandwidth, machine_info, write_json  # noqa: E402

PROMPT = ("Write a short story about a lighthouse keeper who discovers that the light has been "
          "talking to ships in a language only they understand.")


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(generate, prompt_len: int, n: int, repeats: int) -> dict:
    t1 = median_time(lambda: generate(1), repeats)
    tn = median_time(lambda: generate(n), repeats)
    return {"prefill_tok_s": prompt_len / t1, "decode_tok_s": (n - 1) / (tn - t1),
            "decode_ms_per_token": 1e3 * (tn - t1) / (n - 1), "t1_s": t1, "tN_s": tn}


def bench_engine(eng, ids, n, repeats):
    def gen(k):
        out = eng.generate([ids], max_new_tokens=k)[0]
        assert len(out.token_ids) == k, "hit EOS early: choose another prompt or fewer tokens"
        return out
    return measure(gen, len(ids), n, repeats)


def bench_transformers(folder, ids, n, repeats):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    x = torch.tensor([ids])

    def gen(k):
        with torch.inference_mode():
            return model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False)
    return measure(gen, len(ids), n, repeats)


def weight_bytes_per_token(eng) -> int:
    """Bytes of weights a decode step reads: every layer's matrices, norms and the LM head."""
    m = eng.model
    total = m.lm_head.numel() * m.lm_head.element_size() + m.norm.numel() * m.norm.element_size()
    for b in m.blocks:
        for lin in (b.qkv, b.o, b.gate_up, b.down):
            total += lin.weight.numel() * lin.weight.element_size()
        total += 2 * b.attn_norm.numel() * b.attn_norm.element_size()
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-transformers", action="store_true", help="skip the transformers peer")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "bench_generate.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from pf_engine import Engine
    eng = Engine.from_pretrained(args.model, dtype="fp32", device="cpu")
    ids = eng.tokenizer.encode(PROMPT, chat=True)
    rows = {"pf_engine": bench_engine(eng, ids, args.new_tokens, args.repeats)}
    if not args.no_transformers:
        rows["transformers"] = bench_transformers(eng.folder, ids, args.new_tokens, args.repeats)

    bw = copy_bandwidth()
    wbytes = weight_bytes_per_token(eng)
    floor = bw / wbytes
    result = {"benchmark": "bench_generate", "machine": machine_info(), "threads": args.threads,
              "model": eng.folder, "dtype": "fp32", "prompt_tokens": len(ids),
              "new_tokens": args.new_tokens, "repeats": args.repeats,
              "weight_bytes_per_token": wbytes, "copy_bandwidth_GBps": bw / 1e9,
              "floor_decode_tok_s": floor, "results": rows}
    if "transformers" in rows:
        result["decode_speedup_vs_transformers"] = (rows["pf_engine"]["decode_tok_s"]
                                                    / rows["transformers"]["decode_tok_s"])
        result["prefill_speedup_vs_transformers"] = (rows["pf_engine"]["prefill_tok_s"]
                                                     / rows["transformers"]["prefill_tok_s"])
    write_json(args.out, result)

    print(f"\n{platform.processor() or platform.machine()}, {args.threads} threads, fp32, "
          f"prompt {len(ids)} tokens, {args.new_tokens} new tokens, median of {args.repeats}\n")
    print("| engine | prefill tok/s | decode tok/s | ms/token | decode vs transformers |")
    print("|---|---|---|---|---|")
    base = rows.get("transformers", {}).get("decode_tok_s")
    for name, r in rows.items():
        rel = f"{r['decode_tok_s'] / base:.2f}x" if base else "-"
        print(f"| {name} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
              f"{r['decode_ms_per_token']:.1f} | {rel} |")
    print(f"| bytes floor ({wbytes / 1e6:.0f} MB/token at {bw / 1e9:.1f} GB/s copy) | - | "
          f"{floor:.1f} | {1e3 / floor:.1f} | - |")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
