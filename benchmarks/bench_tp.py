"""Tensor parallelism on the CPU: 2 ranks x 1 thread against 1 rank x 2 threads, in one run.

    python benchmarks/bench_tp.py [--rounds 3] [--new-tokens 32]

The model: SmolLM2-135M's shape (hidden 576, 30 layers, FFN 1536, vocab 49152) with 8 heads of
72 and 4 KV heads instead of 9 and 3, so that 2 ranks divide them, and seeded random weights
(decode time does not depend on the values; EOS is ignored).  The engines load it in fp32, or
quantized at load (q4: q4_1 projections, q8_0 embedding), on their default backend; rounds
interleave them.  The 2-rank engines: all-reduces through shared memory (PF_TP_ALLREDUCE=shm) or
gloo, the LM head sharded by vocabulary or replicated (PF_TP_HEAD).  Reported per row (ROWS):
prefill tok/s, decode ms/token and their ratios to 1 rank x 2 threads of the same weights, whether
the first 8 greedy tokens equal that engine's, and per decode step (B = 1) the bytes the
all-reduces carry (2 per layer of B x hidden fp32, plus B x vocab for a sharded head) against the
weight bytes rank 0 reads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import pf_engine  # noqa: F401  (before torch: its OpenMP spin default, pf_engine/__init__.py)
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import command_line, default_out, machine_info, no_prefix_cache, write_json  # noqa: E402

PROMPT = "Tell me about the history of the Roman empire in a few sentences."


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--work", default=None, help="where the random model is cached")
    ap.add_argument("--out", default=default_out("bench_tp"))
    return ap


def model_folder(work: str) -> str:
    """The SmolLM2-shaped random model with 8 heads / 4 KV heads (built once)."""
    import shutil
    import transformers
    from pf_engine.model.bundled import default_model_dir
    out = os.path.join(work, "smollm2-shape-8x4-random")
    if os.path.isfile(os.path.join(out, "model.safetensors")):
        return out
    src = default_model_dir(progress=False)
    cfg = transformers.AutoConfig.from_pretrained(src)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 8, 4, 72
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    os.makedirs(out, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if os.path.isfile(os.path.join(src, name)):
            shutil.copy(os.path.join(src, name), os.path.join(out, name))
    model.save_pretrained(out)
    return out


ONE = "1 rank x 2 threads"
ONE_Q4 = "1 rank x 2 threads, q4"
# row -> (ranks, threads per rank, PF_TP_ALLREDUCE, PF_TP_HEAD, quantize, the row it is compared
# with); "1 rank x 1 thread" shows what a second core gives at all on the machine
ROWS = {
    ONE: (1, 2, None, None, None, ONE),
    "1 rank x 1 thread": (1, 1, None, None, None, ONE),
    "2 ranks x 1 thread, shm, head sharded": (2, 1, "shm", "sharded", None, ONE),
    "2 ranks x 1 thread, shm, head replicated": (2, 1, "shm", "replicated", None, ONE),
    "2 ranks x 1 thread, gloo, head sharded": (2, 1, "gloo", "sharded", None, ONE),
    ONE_Q4: (1, 2, None, None, "q4", ONE_Q4),
    "1 rank x 1 thread, q4": (1, 1, None, None, "q4", ONE_Q4),
    "2 ranks x 1 thread, shm, head sharded, q4": (2, 1, "shm", "sharded", "q4", ONE_Q4),
}


def build(folder, ranks: int, threads: int, allreduce, head, quantize):
    """One row's engine: ``ranks`` of ``threads`` threads each."""
    from pf_engine import Engine
    from pf_engine.parallel.options import choices
    torch.set_num_threads(threads)
    try:
        with choices(allreduce, head):
            eng = Engine.from_pretrained(folder, progress=False, quantize=quantize, tensor_parallel=ranks)
    finally:
        torch.set_num_threads(2)
    eng.eos_ids = set()
    return no_prefix_cache(eng)               # timings of prefill, not of the cache


def rank0_bytes(eng) -> int:
    """The weight bytes rank 0 reads per decode step: its blocks' projections and its head."""
    m = getattr(eng.model, "local", eng.model)
    size = lambda w: w.numel() * w.element_size() if isinstance(w, torch.Tensor) else w.nbytes  # noqa: E731
    return sum(size(lin.weight) for b in m.blocks for lin in b.linears) + size(m.head.weight)


def timed(eng, ids, n):
    t = time.perf_counter()
    eng.generate([ids], max_new_tokens=1)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    eng.generate([ids], max_new_tokens=n)
    return t1, (time.perf_counter() - t - t1) / (n - 1)


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from pf_engine.model.bundled import pf_home
    work = args.work or os.path.join(pf_home(), "bench_tp")
    os.makedirs(work, exist_ok=True)
    folder = model_folder(work)
    engines = {k: build(folder, *spec[:5]) for k, spec in ROWS.items()}
    ids = engines[ONE].tokenizer.encode(PROMPT, chat=True)
    greedy = {k: e.generate([ids], max_new_tokens=8)[0].token_ids for k, e in engines.items()}
    samples = {k: [] for k in engines}
    for _ in range(args.rounds):
        for key, eng in engines.items():
            torch.set_num_threads(ROWS[key][1])
            samples[key].append(timed(eng, ids, args.new_tokens))
    torch.set_num_threads(2)
    c = engines[ONE].config
    rows = {}
    for k, v in samples.items():
        ranks, threads, allreduce, head, quantize, base = ROWS[k]
        rows[k] = {"ranks": ranks, "threads": threads, "allreduce": allreduce, "head": head, "quantize": quantize,
                   "baseline": base,
                   "prefill_tok_s": len(ids) / statistics.median(s[0] for s in v),
                   "decode_ms_per_token": 1e3 * statistics.median(s[1] for s in v),
                   "weight_bytes_rank0_per_decode_step": rank0_bytes(engines[k]),
                   "allreduce_bytes_per_decode_step": 0 if ranks == 1 else
                   (2 * c.num_hidden_layers * c.hidden_size + (c.vocab_size if head == "sharded" else 0)) * 4,
                   "greedy8_equal_baseline": greedy[k] == greedy[base]}
    for r in rows.values():
        r["decode_vs_baseline"] = r["decode_ms_per_token"] / rows[r["baseline"]]["decode_ms_per_token"]
        r["prefill_vs_baseline"] = r["prefill_tok_s"] / rows[r["baseline"]]["prefill_tok_s"]
    for e in engines.values():
        e.close()
    return {"benchmark": "bench_tp", "command": command_line("benchmarks/bench_tp.py", argv or sys.argv[1:]),
            "machine": machine_info(), "model": os.path.basename(folder), "prompt_tokens": len(ids),
            "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": rows, "samples": samples}


def markdown(res: dict) -> str:
    lines = [f"{res['machine']['cpu']}, {res['model']}, prompt {res['prompt_tokens']} tokens, "
             f"{res['new_tokens']} new tokens, median of {res['rounds']} interleaved rounds; each row against "
             "1 rank x 2 threads of the same weights (fp32, or q4: q4_1 projections, q8_0 embedding)", "",
             "| engine | prefill tok/s | decode ms/token (rounds' range) | decode time / 1 rank x 2 threads "
             "| first 8 greedy tokens = its | all-reduced per step | weights rank 0 reads per step |",
             "|---|---|---|---|---|---|---|"]
    for k, r in res["rows"].items():
        one = r["baseline"] == k
        span = [1e3 * d for _, d in res["samples"][k]]
        lines.append(f"| {k} | {r['prefill_tok_s']:.0f} | {r['decode_ms_per_token']:.1f} "
                     f"({min(span):.1f}-{max(span):.1f}) | "
                     f"{'' if one else format(r['decode_vs_baseline'], '.2f') + 'x'} | "
                     f"{'' if one else r['greedy8_equal_baseline']} | "
                     f"{format(r['allreduce_bytes_per_decode_step'] / 1e3, '.0f') + ' kB' if r['ranks'] > 1 else ''} | "
                     f"{r['weight_bytes_rank0_per_decode_step'] / 1e6:.0f} MB |")
    return "\n".join(lines)


def main(argv=None) -> int:
    res = run(argv)
    write_json(build_parser().parse_args(argv).out, res)
    print(markdown(res))
    print(json.dumps(res["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
