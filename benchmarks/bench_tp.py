"""Tensor parallelism on the CPU: 2 ranks x 1 thread against 1 rank x 2 threads, in one run.

    python benchmarks/bench_tp.py [--rounds 3] [--new-tokens 32]

The model: SmolLM2-135M's shape (hidden 576, 30 layers, FFN 1536, vocab 49152) with 8 heads of
72 and 4 KV heads instead of 9 and 3, so that 2 ranks divide them, and seeded random weights
(decode time does not depend on the values; EOS is ignored).  Every engine loads it in fp32 on
its default backend; rounds interleave them.  The 2-rank engines: all-reduces through shared
memory (PF_TP_ALLREDUCE=shm) or gloo, the LM head sharded by vocabulary or replicated
(PF_TP_HEAD).  Reported: prefill tok/s and decode ms/token of each, the ratios to 1 rank, and
per decode step (B = 1) the bytes the all-reduces carry (2 per layer of B x hidden fp32, plus
B x vocab for a sharded head) against the weight bytes rank 0 reads.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

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


TP_ROWS = {   # row -> (PF_TP_ALLREDUCE, PF_TP_HEAD)
    "2 ranks x 1 thread, shm, head sharded": ("shm", "sharded"),
    "2 ranks x 1 thread, shm, head replicated": ("shm", "replicated"),
    "2 ranks x 1 thread, gloo, head sharded": ("gloo", "sharded"),
}
ONE = "1 rank x 2 threads"


def tp_engine(folder, allreduce: str, head: str):
    """A 2-rank engine with these choices."""
    from pf_engine import Engine
    from pf_engine.parallel.options import choices
    with choices(allreduce, head):
        return Engine.from_pretrained(folder, progress=False, tensor_parallel=2)


def timed(eng, ids, n):
    t = time.perf_counter()
    eng.generate([ids], max_new_tokens=1)
    t1 = time.perf_counter() - t
    t = time.perf_counter()
    eng.generate([ids], max_new_tokens=n)
    return t1, (time.perf_counter() - t - t1) / (n - 1)


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from pf_engine import Engine
    from pf_engine.model.bundled import pf_home
    work = args.work or os.path.join(pf_home(), "bench_tp")
    os.makedirs(work, exist_ok=True)
    folder = model_folder(work)
    torch.set_num_threads(2)
    engines = {ONE: (no_prefix_cache(Engine.from_pretrained(folder, progress=False)), 2)}
    torch.set_num_threads(1)
    for key, (allreduce, head) in TP_ROWS.items():
        engines[key] = (tp_engine(folder, allreduce, head), 1)
    torch.set_num_threads(2)
    one = engines[ONE][0]
    for e, _ in engines.values():
        e.eos_ids = set()
    ids = one.tokenizer.encode(PROMPT, chat=True)
    ref = one.generate([ids], max_new_tokens=8)[0].token_ids
    same = {k: e.generate([ids], max_new_tokens=8)[0].token_ids == ref for k, (e, _) in engines.items() if k != ONE}
    samples = {k: [] for k in engines}
    for _ in range(args.rounds):
        for key, (eng, threads) in engines.items():
            torch.set_num_threads(threads)
            samples[key].append(timed(eng, ids, args.new_tokens))
    torch.set_num_threads(2)
    c = one.config
    rows = {k: {"prefill_tok_s": len(ids) / statistics.median(s[0] for s in v),
                "decode_ms_per_token": 1e3 * statistics.median(s[1] for s in v)} for k, v in samples.items()}
    for k, r in rows.items():
        r["decode_vs_1_rank"] = r["decode_ms_per_token"] / rows[ONE]["decode_ms_per_token"]
        r["prefill_vs_1_rank"] = r["prefill_tok_s"] / rows[ONE]["prefill_tok_s"]
    blocks = sum(lin.weight.numel() * 4 for b in one.model.blocks for lin in b.linears)
    head = c.vocab_size * c.hidden_size * 4
    layers = 2 * c.num_hidden_layers * c.hidden_size * 4
    comm = {"head sharded": layers + c.vocab_size * 4, "head replicated": layers}
    reads = {"head sharded": blocks / 2 + head / 2, "head replicated": blocks / 2 + head}
    for e, _ in engines.values():
        if e is not one:
            e.close()
    return {"benchmark": "bench_tp", "command": command_line("benchmarks/bench_tp.py", argv or sys.argv[1:]),
            "machine": machine_info(), "model": os.path.basename(folder), "prompt_tokens": len(ids),
            "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": rows,
            "greedy8_equal": same, "allreduce_bytes_per_decode_step": comm,
            "weight_bytes_rank0_per_decode_step": reads, "samples": samples}


def markdown(res: dict) -> str:
    lines = [f"{res['machine']['cpu']}, {res['model']} (fp32), prompt {res['prompt_tokens']} tokens, "
             f"{res['new_tokens']} new tokens, median of {res['rounds']} interleaved rounds", "",
             "| engine | prefill tok/s | decode ms/token | decode time / 1 rank | greedy = 1 rank |",
             "|---|---|---|---|---|"]
    for k, r in res["rows"].items():
        same = "" if k == ONE else str(res["greedy8_equal"][k])
        lines.append(f"| {k} | {r['prefill_tok_s']:.0f} | {r['decode_ms_per_token']:.1f} | "
                     f"{r['decode_vs_1_rank']:.2f}x | {same} |")
    comm, reads = res["allreduce_bytes_per_decode_step"], res["weight_bytes_rank0_per_decode_step"]
    lines += ["", "Per decode step (B = 1), all-reduces against the weights rank 0 reads: " + "; ".join(
        f"{k}: {comm[k] / 1e3:.0f} kB against {reads[k] / 1e6:.0f} MB" for k in comm) + "."]
    return "\n".join(lines)


def main(argv=None) -> int:
    res = run(argv)
    write_json(build_parser().parse_args(argv).out, res)
    print(markdown(res))
    print(json.dumps(res["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
