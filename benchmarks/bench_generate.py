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
--repeats after two warm-up calls of each.  "vs base": ms/token over pf_engine's base at the same
batch; "mixing ms": ms/token added over the row's own engine's base (pf_engine's for pf rows,
transformers' for the PEFT rows), the cost of the experts alone.
Memory: each row runs in its own process (``--in-process`` runs them all in this one), so its
peak RSS (VmHWM) is that row's engine alone, loading included; on CUDA also peak allocated GPU
memory.  The read floor: the weight bytes one decode step must read (base weights, plus the active
experts' A and B) over the measured read bandwidth (``common.read_bandwidth``, CPU only).  The
1-minute load average before the run is checked: a busy machine's warning goes into the JSON
and the table.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pf_engine  # noqa: F401  (before torch: its OpenMP spin default, pf_engine/__init__.py)
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (CpuWatch, busy_warning, command_line, default_out, machine_info,  # noqa: E402
                               no_prefix_cache, read_bandwidth, write_json)

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
QUICK_CONFIGS = "base,top2:cpu,top2:torch,dense:cpu,dense:torch,dense:naive"
FULL_CONFIGS = ("base,dense:cpu,dense:torch,dense:naive,top2:cpu,top2:torch,top2:naive,auto:cpu,"
                "auto:torch,auto:naive,token:cpu,token:torch,token:naive,mixed:cpu,mixed:torch,"
                "mixed:naive")


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


def median_time(fn, repeats: int, device, warmup: int = 2) -> float:
    for _ in range(warmup):
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


def hf_row(model, tok_ids, n, repeats, device) -> dict:
    x = torch.tensor([tok_ids], device=device)

    def gen(k):
        with torch.inference_mode():
            model.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                           pad_token_id=model.config.eos_token_id)
    with peak_memory(device) as mem:
        row = measure(gen, len(tok_ids), 1, n, repeats, device)
    return {**row, **mem}


# The run --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the bundled model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, help="default fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--quantize", default="f32", choices=("f32", "q8", "q4", "file"),
                    help="pf_engine's weights: f32 (default: the format transformers runs), q8 / q4 "
                         "(quantized at load), file (a GGUF's own formats: the bundled Q4_1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--configs", default=None, help=f"default: {FULL_CONFIGS}")
    ap.add_argument("--batches", default="1", help="batch sizes for non-mixed rows")
    ap.add_argument("--mixed-batches", default="4,16")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--no-peers", action="store_true", help="skip transformers and PEFT rows")
    ap.add_argument("--in-process", action="store_true",
                    help="every row in this process (faster; peak RSS then accumulates across rows)")
    ap.add_argument("--quick", action="store_true",
                    help=f"{QUICK_CONFIGS} + transformers, 16 new tokens, 1 repeat")
    ap.add_argument("--out", default=default_out("bench_generate.json"),
                    help="the JSON to write (default: bench_generate.json under $PF_BENCH_DIR or /tmp/pf-bench)")
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)     # internal: one row, JSON
    return ap


def row_specs(args) -> list[dict]:
    """The rows to run, in order: pf_engine configurations by batch, then the peers."""
    specs = []
    for name, backend in parse_configs(args.configs or FULL_CONFIGS):
        sizes = args.mixed_batches if name == "mixed" else args.batches
        specs += [{"engine": "pf_engine", "config": name, "backend": backend or "-", "batch": int(B)}
                  for B in sizes.split(",")]
    if not args.no_peers:
        specs.append({"engine": "transformers", "config": "base", "backend": "-", "batch": 1})
        specs += [{"engine": "transformers+peft (cat)", "config": c, "backend": "-", "batch": 1}
                  for c in (["top2"] if args.quick else ["top2", "dense"])]
        specs.append({"engine": "peft x-lora", "config": "token", "backend": "-", "batch": 1})
    return specs


class Setup:
    """What every row shares: device, dtype, the base engine and the seeded random bank (the same
    tensors in every process: AdapterBank.random is seeded)."""

    def __init__(self, args):
        from pf_engine import Engine
        from pf_engine.persona.bank import AdapterBank
        from pf_engine.engine import resolve_device, resolve_dtype
        self.args = args
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        # one weight format for every pf_engine row (model/quantize.py); a GGUF's own formats
        # apply to the bundled model and .gguf paths only
        self.quantize = None if args.quantize == "file" else args.quantize
        self.model = args.model
        self.base = Engine.from_pretrained(args.model, device=self.device, dtype=self.dtype,
                                           progress=False, quantize=self.quantize_for(args.model))
        no_prefix_cache(self.base).eos_ids = set()        # every row generates exactly N tokens
        self.bank = AdapterBank.random(self.base.config, rank=args.rank, seed=0, router=True)
        self.bank.router.top_k = 2
        self.bank.token_router.top_k = 2

    def quantize_for(self, model):
        """quantize= for ``model``: f32 is the default for a GGUF too; q8/q4 only for a folder."""
        if self.device.type != "cpu" and self.quantize == "f32":
            return None
        return self.quantize

    def engine(self, backend: str):
        from pf_engine import Engine
        if backend == "-":
            return self.base
        eng = Engine.from_pretrained(self.model, adapters=self.bank, device=self.device,
                                     dtype=self.dtype, backend=backend, progress=False,
                                     quantize=self.quantize_for(self.model))
        no_prefix_cache(eng).eos_ids = set()
        return eng


def run_row(setup: Setup, spec: dict) -> dict:
    """One row's figures (or {"error": ...}); loads what the row needs."""
    from benchmarks import peers
    args, dev, dt, bank = setup.args, setup.device, setup.dtype, setup.bank
    n, reps, folder = args.new_tokens, args.repeats, setup.base.folder
    try:
        if spec["engine"] == "pf_engine":
            B = spec["batch"]
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(B)]
            return engine_row(setup.engine(spec["backend"]), prompts,
                              persona_for(spec["config"], bank.expert_names, B), n, reps)
        ids = setup.base.tokenizer.encode(PROMPTS[0], chat=True)
        if spec["engine"] == "transformers":
            return hf_row(peers.hf_model(folder, dev, dt), ids, n, reps, dev)
        with tempfile.TemporaryDirectory() as tmp:
            dirs = peers.bank_to_peft(bank, folder, tmp)
            if spec["engine"] == "peft x-lora":   # its own (random) per-token router, top-2
                model = peers.xlora_model(folder, dirs, bank.expert_names,
                                          setup.base.config.hidden_size, dev, dt)
            else:
                model = peers.peft_cat_model(folder, dirs, bank.expert_names,
                                             persona_for(spec["config"], bank.expert_names, 1), dev, dt)
            return hf_row(model, ids, n, reps, dev)
    except Exception as e:  # noqa: BLE001 - a configuration that cannot run is reported
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def run_isolated(argv: list[str], spec: dict) -> dict:
    """run_row in a fresh process, so that its peak RSS is this row's alone (load + run)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--row", json.dumps(spec), "--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            return {"error": f"row process failed (exit {proc.returncode}): {tail[:200]}"}
        with open(out) as f:
            return json.load(f)


def derive(rows: list[dict], setup: Setup, bw: float | None) -> None:
    """Ratios to each engine's own base at the same batch, mixing ms over that base, naive/torch,
    the read floor."""
    own_base = {"pf_engine": "pf_engine", "transformers": "transformers",
                "transformers+peft (cat)": "transformers", "peft x-lora": "transformers"}
    base_ms = {(r["engine"], r["batch"]): r["decode_ms_per_token"] for r in rows
               if r["config"] == "base" and "error" not in r}
    pf_base = {b: ms for (e, b), ms in base_ms.items() if e == "pf_engine"}
    w_bytes = weight_bytes(setup.base)
    for r in rows:
        if "error" in r:
            continue
        ms = r["decode_ms_per_token"]
        if r["batch"] in pf_base:
            r["vs_base"] = ms / pf_base[r["batch"]]
        own = base_ms.get((own_base[r["engine"]], r["batch"]))
        if own is not None and r["config"] != "base":
            r["mixing_ms"] = ms - own
        if r["engine"] == "pf_engine" and r["backend"] == "naive":
            fused = next((x for x in rows if x["engine"] == "pf_engine" and x["config"] == r["config"]
                          and x["batch"] == r["batch"] and x["backend"] == "torch"
                          and "error" not in x), None)
            if fused:
                r["naive_over_torch"] = ms / fused["decode_ms_per_token"]
        if bw and r["engine"] == "pf_engine":
            k = active_experts(r["config"], setup.bank.expert_names)
            r["floor_ms_per_token"] = 1e3 * (w_bytes + k * bank_bytes_per_expert(setup.bank, setup.dtype)) / bw


def run(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.quick:
        args.configs = args.configs or QUICK_CONFIGS
        args.new_tokens, args.repeats = min(args.new_tokens, 16), 1
    torch.set_num_threads(args.threads)
    setup = Setup(args)
    if args.row:                                         # a child process: one row, then exit
        write_json(args.out, run_row(setup, json.loads(args.row)))
        return {}
    watch = CpuWatch()
    child_argv = [a for i, a in enumerate(argv) if a != "--out" and (i == 0 or argv[i - 1] != "--out")]
    dname = str(setup.dtype).replace("torch.", "")
    rows = []
    head = {"benchmark": "bench_generate", "command": command_line("python benchmarks/bench_generate.py", argv),
            "device": str(setup.device), "dtype": dname, "model": setup.base.folder,
            "weights": setup.base.weight_formats,
            "new_tokens": args.new_tokens, "repeats": args.repeats,
            "rss": ("each row in its own process: peak RSS covers loading and running it"
                    if not args.in_process else "one process: peak RSS accumulates across rows")}
    for spec in row_specs(args):
        row = run_row(setup, spec) if args.in_process else run_isolated(child_argv, spec)
        rows.append({**spec, **row})
        # a run cut short (a lent GPU's time) keeps the rows it made
        write_json(args.out, {**head, "complete": False, "rows": rows})
        print(f"  {spec['engine'][:12]:12s} {spec['config']:6s} {spec['backend']:6s} B={spec['batch']:<3d} "
              + (f"{row['decode_ms_per_token']:.1f} ms/token" if "error" not in row else row["error"]),
              file=sys.stderr)
    bw = read_bandwidth(setup.device) if setup.device.type == "cpu" else None
    derive(rows, setup, bw)
    result = {**head, "machine": machine_info(), "threads": args.threads, "complete": True,
              "bank": {"experts": setup.bank.num_experts, "rank": args.rank, "modules": 7},
              "weight_bytes_per_token": weight_bytes(setup.base),
              "read_bandwidth_GBps": bw / 1e9 if bw else None,
              "other_cpu_cores": watch.other_cores(), "busy": busy_warning(watch.other_cores()),
              "rows": rows}
    write_json(args.out, result)
    print(markdown(result))
    print(f"\nwrote {args.out}")
    return result


def weight_bytes(eng) -> int:
    """Base weight bytes one decode step reads: every block's matrices and norms, the head."""
    m = eng.model
    head = m.head.weight
    total = head.numel() * head.element_size() + m.norm.numel() * m.norm.element_size()
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
    where = m.get("gpu") if result["device"].startswith("cuda") else m["cpu"]
    lines = [f"{where}, {result['threads']} threads, {result['device']}, {result['dtype']}, "
             f"{result['new_tokens']} new tokens, median of {result['repeats']}; bank: "
             f"{result['bank']['experts']} experts, rank {result['bank']['rank']}, 7 modules; "
             f"{result.get('rss', 'one process')}", ""]
    if result.get("busy"):
        lines += [f"**Warning: {result['busy']}.**", ""]
    lines += ["| engine | persona | backend | batch | prefill tok/s | decode tok/s | ms/token "
              "| vs base | mixing ms | naive/torch | read floor ms | peak RSS MB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    f = lambda r, k, fmt: (fmt % r[k]) if r.get(k) is not None else "-"  # noqa: E731
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['config']} | {r['backend']} | {r['batch']} | "
                         f"error: {r['error'][:80]} | | | | | | | |")
            continue
        lines.append(f"| {r['engine']} | {r['config']} | {r['backend']} | {r['batch']} | "
                     f"{f(r, 'prefill_tok_s', '%.0f')} | {f(r, 'decode_tok_s', '%.1f')} | "
                     f"{f(r, 'decode_ms_per_token', '%.1f')} | {f(r, 'vs_base', '%.2fx')} | "
                     f"{f(r, 'mixing_ms', '%+.1f')} | "
                     f"{f(r, 'naive_over_torch', '%.2fx')} | {f(r, 'floor_ms_per_token', '%.1f')} | "
                     f"{f(r, 'peak_rss_mb', '%.0f')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
