"""End-to-end prefill and decode speed: base, persona mixtures on every backend, and peers.

    python benchmarks/bench_generate.py                # bundled SmolLM2-135M, fp32, 2 threads
    python benchmarks/bench_generate.py --quick        # the headline rows only
    python benchmarks/bench_generate.py --configs base,top2:torch --no-peers --new-tokens 32

Configurations (``--configs``, NAME[:BACKEND] comma-separated; backends default to torch and
naive): ``base`` (no adapters); with a seeded random bank of ten Big Five experts, rank 16, all
seven modules: ``dense`` (all ten experts weighted), ``top2`` (two experts, what an explicit
persona usually is), ``auto`` (the bank's sequence router, top-2), ``token`` (the token router,
top-2 per token and layer); ``mixed`` (a batch with a different persona per request, some none).
Batch sizes: ``--batches`` (default 1; ``mixed`` runs at 4 and 16).
Peers in the same run (``--no-peers`` skips them): transformers' ``generate`` on the base model,
transformers + PEFT with the same experts combined by ``add_weighted_adapter(...,
combination_type="cat")`` into one adapter per persona (dense and top-2), what a user does today,
and PEFT X-LoRA over the same experts (top-2 per token; its row records an error where it does
not run).

Timing, the same for every row: t1 = a generate of 1 token (prefill + one sample), tN = a
generate of N tokens, EOS ignored so every row makes exactly N; prefill tok/s = prompt tokens /
t1, decode ms/token = (tN - t1) / (N - 1) per step, decode tok/s = batch / that.  Medians over
--repeats after a warm-up.  Peak RSS per row (VmHWM, reset before each row) and, on CUDA, peak
allocated GPU memory.  The bytes floor: the weight bytes one decode step must read over the
measured copy bandwidth (base weights, plus the active experts' A and B).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import copy_bandwidth, machine_info, write_json  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper who discovers that the light has been "
    "talking to ships in a language only they understand.",
    "I failed my driving test for the third time today and I feel like giving up.",
    "My parcel was supposed to arrive on Monday and it still has not shown up.",
    "Plan a weekend trip to the mountains for two friends who like photography.",
]
DENSE_WEIGHT = 0.1
TOP2 = {"extraversion+": 0.6, "agreeableness+": 0.4}
MIXED = [{"agreeableness+": 0.8, "extraversion+": 0.4}, {"conscientiousness+": 1.0},
         None, {"openness+": 0.5, "neuroticism-": 0.5}]
QUICK_CONFIGS = "base,top2:torch,dense:torch,dense:naive"
FULL_CONFIGS = ("base,dense:torch,dense:naive,top2:torch,top2:naive,auto:torch,auto:naive,"
                "token:torch,token:naive,mixed:torch,mixed:naive")


def parse_configs(spec: str) -> list[tuple[str, str | None]]:
    out = []
    for item in spec.split(","):
        name, _, backend = item.strip().partition(":")
        if name not in ("base", "dense", "top2", "auto", "token", "mixed"):
            raise SystemExit(f"bench_generate: unknown configuration {name!r}")
        if name == "base":
            out.append((name, None))
        else:
            out.extend((name, b) for b in ([backend] if backend else ["torch", "naive"]))
    return out


def persona_for(name: str, experts: list[str], batch: int):
    if name == "base":
        return None
    if name == "dense":
        return {n: DENSE_WEIGHT for n in experts}
    if name == "top2":
        return TOP2
    if name in ("auto", "token"):
        return name
    return [MIXED[i % len(MIXED)] for i in range(batch)]


def active_experts(name: str, experts: list[str]) -> int:
    """Experts whose weights a decode step reads (for the bytes floor)."""
    return {"base": 0, "dense": len(experts), "top2": 2, "auto": 2, "token": len(experts),
            "mixed": len({k for p in MIXED if p for k in p})}[name]


@contextlib.contextmanager
def peak_memory(device: torch.device):
    """Yields a dict filled on exit with peak_rss_mb (and peak_gpu_mb on CUDA) for the block."""
    out = {}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                   # reset VmHWM (Linux)
    except OSError:
        pass
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    yield out
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    out["peak_rss_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    if device.type == "cuda":
        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, repeats: int, device) -> float:
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(generate, prompt_tokens: int, batch: int, n: int, repeats: int, device) -> dict:
    t1 = median_time(lambda: generate(1), repeats, device)
    tn = median_time(lambda: generate(n), repeats, device)
    step = (tn - t1) / (n - 1)
    return {"prefill_tok_s": prompt_tokens / t1, "decode_ms_per_token": 1e3 * step,
            "decode_tok_s": batch / step, "t1_s": t1, "tN_s": tn}


def engine_row(eng, prompts, persona, n, repeats) -> dict:
    ids = [eng.tokenizer.encode(p, chat=True) for p in prompts]

    def gen(k):
        outs = eng.generate(ids, max_new_tokens=k, persona=persona)
        assert all(len(o.token_ids) == k for o in outs)
    with peak_memory(eng.device) as mem:
        row = measure(gen, sum(map(len, ids)), len(ids), n, repeats, eng.device)
    return {**row, **mem}


# Peers ----------------------------------------------------------------------------------------
def hf_model(folder, device, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def hf_row(model, tok_ids, n, repeats, device) -> dict:
    x = torch.tensor([tok_ids], device=device)

    def gen(k):
        with torch.inference_mode():
            model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                           pad_token_id=model.config.eos_token_id)
    with peak_memory(device) as mem:
        row = measure(gen, len(tok_ids), 1, n, repeats, device)
    return {**row, **mem}


def bank_to_peft(bank, folder: str, out_dir: str) -> list[str]:
    """Write each expert of ``bank`` as a PEFT LoRA folder (same A, B and scaling)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from pf_engine.config import HF_MODULE_NAMES
    dirs = []
    for k, name in enumerate(bank.expert_names):
        d = os.path.join(out_dir, f"expert{k}")
        os.makedirs(d)
        targets = [HF_MODULE_NAMES[m].split(".")[-1] for m in bank.expert_modules(k)]
        r = bank.ranks[k]
        LoraConfig(r=r, lora_alpha=bank.scalings[k] * r, target_modules=targets,
                   base_model_name_or_path=folder).save_pretrained(d)
        tensors = {}
        for l in range(bank.num_layers):
            for m in bank.expert_modules(k):
                lw = bank.lora(l, m)
                j = lw.expert_ids.tolist().index(k)
                r0, r1 = lw.rank_offsets[j].item(), lw.rank_offsets[j + 1].item()
                stem = f"base_model.model.model.layers.{l}.{HF_MODULE_NAMES[m]}"
                tensors[stem + ".lora_A.weight"] = lw.a[r0:r1].float().contiguous()
                tensors[stem + ".lora_B.weight"] = lw.b[:, r0:r1].float().contiguous()
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
        dirs.append(d)
    return dirs


def peft_cat_model(folder, peft_dirs, names, weights: dict, device, dtype):
    """transformers + PEFT: the persona's experts combined by add_weighted_adapter(cat)."""
    from peft import PeftModel
    model = PeftModel.from_pretrained(hf_model(folder, device, dtype), peft_dirs[0],
                                      adapter_name=names[0])
    for d, n in zip(peft_dirs[1:], names[1:]):
        model.load_adapter(d, adapter_name=n)
    used = [n for n in names if weights.get(n, 0)]
    model.add_weighted_adapter(used, [weights[n] for n in used], adapter_name="persona",
                               combination_type="cat")
    model.set_adapter("persona")
    return model.eval()


def xlora_model(folder, peft_dirs, names, hidden_size, device, dtype, top_k=2):
    """PEFT X-LoRA over the same experts: per-token mixing by a (random) X-LoRA classifier,
    computed with PEFT's extra scaling pass and a Python loop over adapters."""
    from peft import XLoraConfig, get_peft_model
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=hidden_size, xlora_depth=1,
                      adapters={f"expert{i}": d for i, d in enumerate(peft_dirs)}, top_k_lora=top_k,
                      enable_softmax=False, enable_softmax_topk=True)
    model = hf_model(folder, device, dtype)
    model.config.use_cache = False
    return get_peft_model(model, cfg).eval()


# The run --------------------------------------------------------------------------------------
def run(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default=None, help=f"default: {FULL_CONFIGS}")
    ap.add_argument("--batches", default="1", help="batch sizes for non-mixed rows")
    ap.add_argument("--mixed-batches", default="4,16")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-peers", action="store_true", help="skip transformers and PEFT rows")
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_CONFIGS} + transformers, 16 new tokens, 1 repeat")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "bench_generate.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.configs = args.configs or QUICK_CONFIGS
        args.new_tokens, args.repeats = min(args.new_tokens, 16), 1
    configs = parse_configs(args.configs or FULL_CONFIGS)
    torch.set_num_threads(args.threads)

    from pf_engine import Engine
    from pf_engine.adapters import AdapterBank
    from pf_engine.engine import resolve_device, resolve_dtype
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dname = str(dtype).replace("torch.", "")
    base = Engine.from_pretrained(args.model, device=device, dtype=dtype, progress=False)
    base.eos_ids = set()        # every row generates exactly N tokens
    bank = AdapterBank.random(base.config, rank=args.rank, seed=0, router=True)
    bank.router.top_k = 2
    bank.token_router.top_k = 2
    engines = {}

    def engine(backend):
        if backend is None:
            return base
        if backend not in engines:
            engines[backend] = Engine.from_pretrained(base.folder, adapters=bank, device=device,
                                                      dtype=dtype, backend=backend, progress=False)
            engines[backend].eos_ids = set()
        return engines[backend]

    n, reps = args.new_tokens, args.repeats
    rows = []
    batches = [int(b) for b in args.batches.split(",")]
    for name, backend in configs:
        for B in ([int(b) for b in args.mixed_batches.split(",")] if name == "mixed" else batches):
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(B)]
            persona = persona_for(name, bank.expert_names, B)
            try:
                row = engine_row(engine(backend), prompts, persona, n, reps)
            except Exception as e:  # noqa: BLE001 - a backend that cannot run is reported
                row = {"error": f"{type(e).__name__}: {e}"}
            rows.append({"engine": "pf_engine", "config": name, "backend": backend or "-",
                         "batch": B, **row})
            # a run cut short (a lent GPU's time) keeps the rows it made
            write_json(args.out, {"benchmark": "bench_generate", "complete": False,
                                  "device": str(device), "dtype": dname, "model": base.folder,
                                  "new_tokens": n, "repeats": reps, "rows": rows})
            print(f"  {name:6s} {backend or '-':6s} B={B:<3d} "
                  + (f"{row['decode_ms_per_token']:.1f} ms/token" if "error" not in row
                     else row["error"]), file=sys.stderr)

    if not args.no_peers:
        ids = base.tokenizer.encode(PROMPTS[0], chat=True)
        hf = hf_model(base.folder, device, dtype)
        rows.append({"engine": "transformers", "config": "base", "backend": "-", "batch": 1,
                     **hf_row(hf, ids, n, reps, device)})
        del hf
        peers = ["top2"] if args.quick else ["top2", "dense"]
        with tempfile.TemporaryDirectory() as tmp:
            try:
                dirs = bank_to_peft(bank, base.folder, tmp)
                for name in peers:
                    model = peft_cat_model(base.folder, dirs, bank.expert_names,
                                           persona_for(name, bank.expert_names, 1), device, dtype)
                    rows.append({"engine": "transformers+peft (cat)", "config": name,
                                 "backend": "-", "batch": 1,
                                 **hf_row(model, ids, n, reps, device)})
                    del model
            except Exception as e:  # noqa: BLE001
                rows.append({"engine": "transformers+peft (cat)", "config": "top2",
                             "backend": "-", "batch": 1, "error": f"{type(e).__name__}: {e}"})
            try:   # X-LoRA "where it runs": its own per-token router (random here), top-2
                model = xlora_model(base.folder, dirs, bank.expert_names, base.config.hidden_size,
                                    device, dtype)
                rows.append({"engine": "peft x-lora", "config": "token", "backend": "-",
                             "batch": 1, **hf_row(model, ids, n, reps, device)})
                del model
            except Exception as e:  # noqa: BLE001
                rows.append({"engine": "peft x-lora", "config": "token", "backend": "-",
                             "batch": 1, "error": f"{type(e).__name__}: {str(e)[:200]}"})

    # derived figures: ratios to base at the same batch size, naive/torch, the bytes floor
    bw = copy_bandwidth() if device.type == "cpu" else None
    base_ms = {r["batch"]: r["decode_ms_per_token"] for r in rows
               if r["engine"] == "pf_engine" and r["config"] == "base" and "error" not in r}
    w_bytes = weight_bytes(base)
    for r in rows:
        if "error" in r:
            continue
        if r["batch"] in base_ms:
            r["vs_base"] = r["decode_ms_per_token"] / base_ms[r["batch"]]
        if r["engine"] == "pf_engine" and r["backend"] == "naive":
            fused = next((x for x in rows if x["engine"] == "pf_engine" and x["config"] == r["config"]
                          and x["batch"] == r["batch"] and x["backend"] == "torch"
                          and "error" not in x), None)
            if fused:
                r["naive_over_torch"] = r["decode_ms_per_token"] / fused["decode_ms_per_token"]
        if bw and r["engine"] == "pf_engine":
            k = active_experts(r["config"], bank.expert_names)
            floor_bytes = w_bytes + k * bank_bytes_per_expert(bank, dtype)
            r["floor_ms_per_token"] = 1e3 * floor_bytes / bw
    result = {"benchmark": "bench_generate", "machine": machine_info(), "threads": args.threads,
              "device": str(device), "dtype": dname, "model": base.folder, "complete": True,
              "new_tokens": n, "repeats": reps, "bank": {"experts": bank.num_experts,
                                                         "rank": args.rank, "modules": 7},
              "weight_bytes_per_token": w_bytes,
              "copy_bandwidth_GBps": bw / 1e9 if bw else None, "rows": rows}
    write_json(args.out, result)
    print(markdown(result))
    print(f"\nwrote {args.out}")
    return result


def weight_bytes(eng) -> int:
    """Base weight bytes one decode step reads: every block's matrices and norms, the head."""
    m = eng.model
    total = m.lm_head.numel() * m.lm_head.element_size() + m.norm.numel() * m.norm.element_size()
    for b in m.blocks:
        total += sum(lin.weight.numel() * lin.weight.element_size() for lin in b.linears)
        total += 2 * b.attn_norm.numel() * b.attn_norm.element_size()
    return total


def bank_bytes_per_expert(bank, dtype) -> float:
    size = torch.tensor([], dtype=dtype).element_size()
    total = sum(lw.a.numel() + lw.b.numel() for l in range(bank.num_layers)
                for m in bank.target_modules if (lw := bank.lora(l, m)) is not None)
    return total * size / bank.num_experts


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"{m['cpu']}, {result['threads']} threads, {result['device']}, {result['dtype']}, "
             f"{result['new_tokens']} new tokens, median of {result['repeats']}; bank: "
             f"{result['bank']['experts']} experts, rank {result['bank']['rank']}, 7 modules",
             "",
             "| engine | persona | backend | batch | prefill tok/s | decode tok/s | ms/token "
             "| vs base | naive/torch | floor ms/token | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda r, k, fmt: (fmt % r[k]) if r.get(k) is not None else "-"  # noqa: E731
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['config']} | {r['backend']} | {r['batch']} | "
                         f"error: {r['error'][:80]} | | | | | | |")
            continue
        lines.append(f"| {r['engine']} | {r['config']} | {r['backend']} | {r['batch']} | "
                     f"{f(r, 'prefill_tok_s', '%.0f')} | {f(r, 'decode_tok_s', '%.1f')} | "
                     f"{f(r, 'decode_ms_per_token', '%.1f')} | {f(r, 'vs_base', '%.2fx')} | "
                     f"{f(r, 'naive_over_torch', '%.2fx')} | {f(r, 'floor_ms_per_token', '%.1f')} | "
                     f"{f(r, 'peak_rss_mb', '%.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
