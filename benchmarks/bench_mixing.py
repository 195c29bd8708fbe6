"""One adapted linear layer, every available mixing backend side by side, against the bytes floor.

    python benchmarks/bench_mixing.py --quick                    # SmolLM2 shapes, < 1 min on CPU
    python benchmarks/bench_mixing.py --shapes llama7b --K 1,4,10 --T 1,64 --plots results/
    python benchmarks/bench_mixing.py --device cuda --dtype bf16 --T 1,8,64,512

Each row goes through the engine's own path: ``pf_engine.model.linear.Linear`` with K random
experts of rank r attached (``Linear.attach``) and bound to the backend under test
(``Linear.bind``: its prepared state), called as ``Linear.full(x, Mix(gates))`` on x [T, 1, d_in]:
T sequences in one decode step.
Backends: ``base`` (the same projection with no experts on the backend ``auto`` picks: the
roofline, what the engine's base model runs), ``F.linear`` (CPU only: torch's y = x W^T form
beside the engine's W x^T one, see ``backends/gemm.py``; timed with torch's threads as set),
``naive`` (a loop over experts), ``torch`` (grouped: two GEMMs whatever K is), ``cpu`` (csrc/cpu's
fused pass) and ``triton`` / ``cuda`` where ``backends.backend_status`` says they run.

Gates [T, K] fp32:
    dense       softmax of random logits: every expert active for every token
    top2-token  per-token top-2 of random logits, softmax over the two (the token router's case;
                over many tokens the union of active experts is usually all K)
    top2-seq    one pair of experts and one pair of weights for every token (explicit personas and
                the sequence router: the grouped backend reads only those two experts)
    token-router  the engine's token path: each call builds Mix(g, token_router, rows) and
                calls enter_layer on its input, so a random TokenRouter (top-2) computes the gates
                inside the timed call, as in every layer of a token-routed decode step (the router
                reads the projection's input, [T, d_in])
    regather    top2-seq whose pair changes on every visit to a layer copy (a persona switch, a
                request that finishes): the grouped backend re-gathers the active experts' rows
                each call, and each call builds its Mix, as the engine does per forward
The top-2 kinds (and token-router, regather) need K >= 3 to differ from dense and are skipped for K < 3;
at T = 1 the two
top-2 kinds are the same computation (two rows as a noise check).

Check before timing: every backend's output y (base included) against an fp64 reference computed
apart from every backend: x W^T in fp64 plus pf_kernels.reference.grouped_lora_ref per projection,
on the same (rounded) weights and input; the row passes when
max |y - y_ref| <= tol * max |y_ref|, tol = 1e-5 (fp32), 1e-2 (fp16, bf16), as tests/test_kernels;
in fp16/bf16 the naive backend rounds four times per active expert (A_k x, B_k h, g s delta and
y += delta, each in the low dtype), so its tol is max(1e-2, (4 n_active + 2) u), u the unit
roundoff (2^-9 bf16, 2^-12 fp16).
The experts are drawn so that their delta is of the order of the base output, so a dropped expert
fails the check.  A failing backend is not timed: its row says "FAILED check" and the exit status
is 1 at the end (0 with --allow-fail).

Timing: warm-up calls (until the call times settle), then up to --repeats calls (at most --budget seconds
per row, at least 3),
median.  Calls rotate among 4 inputs and among enough copies of the layer (weights and experts) to
hold at least --rotate-mb, so that the weights come from memory as in a decode step through all
layers, not from a warm cache.  CUDA: device events around each call, synchronised at the end.
CPU: torch.set_num_threads(--threads); rows of at most the backend's ``few_rows`` run under the
engine's thread policy (its backend's ``policy``, backends/threads.py: torch at 1 thread, the kernel's or BLAS's
threads at --threads), as the engine decodes.

Bytes that must move: the base weight, the A and B blocks of the experts active anywhere in the
batch, the activations x and y, the gates.  GB/s = bytes / median time; read floor = bytes / the
measured read bandwidth (``common.read_bandwidth``: a sum over 256 MB on CPU, 1 GiB on CUDA),
since a decode GEMV mostly reads; "% of floor" = floor / time.  The 1-minute load average before
the run is checked: a busy machine's warning goes into the JSON and the tables.
Writes --out (JSON) and prints a markdown table (also --md PATH); --plots DIR draws PNGs.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import zlib
from dataclasses import dataclass

import pf_engine  # noqa: F401  (before torch: its OpenMP spin default, pf_engine/__init__.py)
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (CpuWatch, busy_warning, command_line, default_out, machine_info,  # noqa: E402
                               read_bandwidth, write_json)
from benchmarks.mixing_report import draw_plots, markdown  # noqa: E402,F401
from pf_engine.persona.bank import LoraWeights  # noqa: E402
from pf_engine.backends import BACKENDS, backend_status, create, resolve_backend  # noqa: E402
from pf_engine.engine import DTYPES  # noqa: E402
from pf_engine.model.linear import Linear  # noqa: E402
from pf_engine.persona.mix import Mix  # noqa: E402
from pf_engine.backends.threads import ThreadPolicy  # noqa: E402
from pf_kernels.layout import RankLayout  # noqa: E402
from pf_kernels.reference import grouped_lora_ref  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
ROUNDOFF = {torch.float16: 2.0**-12, torch.bfloat16: 2.0**-9}     # unit roundoff (see check rule)
GATE_KINDS = ("dense", "top2-token", "top2-seq", "token-router", "regather")
ALL_BACKENDS = ("base", "F.linear", "naive", "torch", "cpu", "triton", "cuda")
N_INPUTS = 4
MAX_COPIES = 64
SCALING = 2.0                                    # alpha / r with alpha = 2r, as AdapterBank.random


@dataclass(frozen=True)
class Proj:
    """One engine Linear: ``splits``/``modules`` as model.Block builds it (fused q|k|v, gate|up)."""
    group: str
    name: str
    d_in: int
    splits: tuple
    modules: tuple

    @property
    def d_out(self) -> int:
        return sum(self.splits)

    @property
    def label(self) -> str:
        return f"{self.group}/{self.name}"


def _llama_projs(group, d, q, kv, f):
    return [Proj(group, "qkv", d, (q, kv, kv), ("q", "k", "v")), Proj(group, "o", q, (d,), ("o",)),
            Proj(group, "gate_up", d, (f, f), ("gate", "up")), Proj(group, "down", f, (d,), ("down",))]


SHAPES = {
    "tiny": _llama_projs("tiny", 64, 64, 32, 128),                   # config.PRESETS["tiny"]
    "smollm2": _llama_projs("smollm2", 576, 576, 192, 1536),         # SmolLM2-135M, the bundled model
    "llama7b": [Proj("llama7b", "o", 4096, (4096,), ("o",)),         # 4096 -> 4096 (q, o)
                Proj("llama7b", "up", 4096, (11008,), ("up",)),      # 4096 -> 11008 (gate, up)
                Proj("llama7b", "down", 11008, (4096,), ("down",))],  # 11008 -> 4096
}
FULL = dict(shapes="smollm2,llama7b", K="1,2,4,10,16", r="8,16,64", T="1,4,16,64,256",
            gates="dense,top2,token-router,regather", backends="auto", repeats=50, warmup=5,
            budget=2.0)
QUICK = dict(shapes="smollm2", K="1,4,10", r="16", T="1,16", gates="dense,top2", backends="auto",
             repeats=30, warmup=3, budget=0.25)


# Inputs -------------------------------------------------------------------------------------------
def _gen(*key) -> torch.Generator:
    """A CPU generator seeded from ``key`` (stable across runs, unlike hash() of strings)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def make_experts(p: Proj, K: int, r: int, gen, dtype, device) -> dict:
    """Per module, K experts of rank r as the LoraWeights a bank gives (A ~ U(+-1/sqrt(d_in)) as
    PEFT; B ~ N(0, 1/r) so that g * s * B A x is of the order of W x: the check sees every expert)."""
    loras = {}
    layout = RankLayout.interned(range(K), [r] * K, [SCALING] * K, device)
    for m, d_out in zip(p.modules, p.splits):
        a = (torch.rand(K * r, p.d_in, generator=gen) * 2 - 1) / math.sqrt(p.d_in)
        b = torch.randn(d_out, K * r, generator=gen) / math.sqrt(r)
        loras[m] = LoraWeights(a.to(device, dtype), b.to(device, dtype), layout)
    return loras


def make_gates(kind: str, T: int, K: int, gen) -> torch.Tensor:
    """[T, K] fp32 gates of ``kind`` (see the module docstring)."""
    logits = torch.randn(T, K, generator=gen)
    if kind == "dense":
        return logits.softmax(-1)
    if kind == "top2-token":
        top, idx = logits.topk(2, dim=-1)
        return torch.zeros(T, K).scatter_(1, idx, top.softmax(-1))
    if kind == "token-router":                  # every row token-routed: fixed gates unused
        return torch.zeros(T, K)
    pair = torch.randperm(K, generator=gen)[:2]                     # top2-seq, regather
    g = torch.zeros(T, K)
    g[:, pair] = torch.randn(2, generator=gen).softmax(-1)
    return g


def other_pair(g: torch.Tensor, gen) -> torch.Tensor:
    """regather's second gates: another pair of experts (at least one new), other weights."""
    K = g.shape[1]
    old = set(torch.nonzero(g[0]).flatten().tolist())
    while True:
        pair = torch.randperm(K, generator=gen)[:2]
        if set(pair.tolist()) != old:
            break
    g2 = torch.zeros_like(g)
    g2[:, pair] = torch.randn(2, generator=gen).softmax(-1)
    return g2


def expert_bytes(lin: Linear, active, esize: int) -> int:
    """Bytes of the A rows and B columns of the ``active`` experts over every projection."""
    d_in, act = lin.weight.shape[1], set(active)
    return sum((r1 - r0) * (d_in + p.out1 - p.out0) * esize
               for p in lin.parts for e, r0, r1, _ in p.layout.blocks if e in act)


# Timing -------------------------------------------------------------------------------------------
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device, warmup: int, repeats: int, budget: float) -> tuple[float, int]:
    """(median seconds, calls timed) of fn(i), i = 0, 1, ... (fn rotates its inputs by i).

    Warm-up: at least ``warmup`` calls, and on until the last three settle within 1.5x of the
    fastest (for at most min(1 s, 4 budgets)): right after a change of thread mode, or with another process
    on the cores, the first calls can take a scheduler slice each (~16 ms) and would otherwise
    fill the median of a short row.
    """
    warm, t0 = [], time.perf_counter()
    while True:
        t = time.perf_counter()
        fn(len(warm))
        sync(device)
        warm.append(time.perf_counter() - t)
        if len(warm) >= max(warmup, 3) and (statistics.median(warm[-3:]) <= 1.5 * min(warm)
                                             or time.perf_counter() - t0 > min(1.0, 4 * budget)):
            break
    per_call = statistics.median(warm[-3:])
    n = max(3, min(repeats, int(budget / max(per_call, 1e-7))))
    if device.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(n)]
        for i, (s, e) in enumerate(ev):
            s.record()
            fn(len(warm) + i)
            e.record()
        sync(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in ev]
    else:
        times = []
        for i in range(n):
            t = time.perf_counter()
            fn(len(warm) + i)
            times.append(time.perf_counter() - t)
    return statistics.median(times), n


# The harness --------------------------------------------------------------------------------------
def _csv(s: str) -> list[str]:
    return [v.strip() for v in str(s).split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", help=f"groups ({', '.join(SHAPES)}) or group/proj, comma-separated "
                                     f"(default {FULL['shapes']})")
    ap.add_argument("--K", help=f"numbers of experts (default {FULL['K']})")
    ap.add_argument("--r", help=f"ranks (default {FULL['r']})")
    ap.add_argument("--T", help=f"token rows per call (default {FULL['T']})")
    ap.add_argument("--gates", help="dense, top2 (= top2-token,top2-seq), top2-token, top2-seq, "
                    "token-router, regather "
                                    f"(default {FULL['gates']})")
    ap.add_argument("--backends", help=f"auto (every available one) or some of "
                                       f"{', '.join(ALL_BACKENDS)} (base is always timed)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default=None, help="fp32, fp16, bf16 (default fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, help=f"most timed calls per row (default {FULL['repeats']})")
    ap.add_argument("--warmup", type=int, help=f"warm-up calls per row (default {FULL['warmup']})")
    ap.add_argument("--budget", type=float, help="most seconds of timed calls per row (at least 3 "
                                                 f"calls; default {FULL['budget']})")
    ap.add_argument("--rotate-mb", type=float, default=None,
                    help="rotate among copies of the layer holding at least this many MB "
                         "(default 64 on CPU, 256 on CUDA; 0: one copy, cache-warm)")
    ap.add_argument("--quick", action="store_true",
                    help=f"small subset: shapes {QUICK['shapes']}, K {QUICK['K']}, r {QUICK['r']}, "
                         f"T {QUICK['T']} (explicit flags still win)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--allow-fail", action="store_true", help="exit 0 even if a backend fails the check")
    ap.add_argument("--out", default=default_out("bench_mixing.json"),
                    help="the JSON to write (default: bench_mixing.json under $PF_BENCH_DIR or /tmp/pf-bench)")
    ap.add_argument("--md", default=None, help="also write the markdown table to this path")
    ap.add_argument("--plots", default=None, help="draw PNG plots into this folder")
    return ap


def resolve(ap, args) -> dict:
    """Parsed flags -> lists and numbers, with --quick / full defaults where a flag was not given."""
    dflt = QUICK if args.quick else FULL
    get = lambda k: getattr(args, k) if getattr(args, k) is not None else dflt[k]  # noqa: E731
    projs = []
    for s in _csv(get("shapes")):
        group, _, name = s.partition("/")
        if group not in SHAPES:
            ap.error(f"--shapes: unknown shape {s!r}; expected some of {', '.join(SHAPES)}")
        sel = [p for p in SHAPES[group] if not name or p.name == name]
        if not sel:
            ap.error(f"--shapes: {group} has no projection {name!r}; it has "
                     f"{', '.join(p.name for p in SHAPES[group])}")
        projs += [p for p in sel if p not in projs]
    try:
        Ks, rs, Ts = ([int(v) for v in _csv(get(k))] for k in ("K", "r", "T"))
    except ValueError as e:
        ap.error(f"--K/--r/--T take comma-separated integers ({e})")
    if min(Ks + rs + Ts, default=0) < 1:
        ap.error("--K, --r and --T values must be >= 1")
    gates = []
    for g in _csv(get("gates")):
        for k in (("top2-token", "top2-seq") if g == "top2" else (g,)):
            if k not in GATE_KINDS:
                ap.error(f"--gates: unknown {g!r}; expected dense, top2, {', '.join(GATE_KINDS[1:])}")
            gates += [k] if k not in gates else []
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no GPU visible (torch.cuda.is_available() is False)")
    dtype_name = (args.dtype or ("bf16" if device.type == "cuda" else "fp32")).lower()
    if dtype_name not in DTYPES:
        ap.error(f"--dtype {args.dtype!r}: expected fp32, fp16 or bf16")
    status = {b: backend_status(b, device) for b in BACKENDS}
    status["base"] = (True, "")
    status["F.linear"] = (device.type == "cpu", "" if device.type == "cpu" else
                          "on CUDA the engine's linear already is F.linear")
    want = _csv(get("backends"))
    if want == ["auto"]:
        # triton on CPU only runs interpreted (TRITON_INTERPRET=1): far too slow to time unasked
        backends = [b for b in ALL_BACKENDS if status[b][0]
                    and not (b == "triton" and device.type == "cpu")]
    else:
        bad = [b for b in want if b not in ALL_BACKENDS]
        if bad:
            ap.error(f"--backends: unknown {bad}; expected auto or some of {', '.join(ALL_BACKENDS)}")
        backends = ["base"] + [b for b in ALL_BACKENDS if b in want and b != "base" and status[b][0]]
    objects = {b: create(b, device) for b in backends if b not in ("base", "F.linear")}
    return dict(projs=projs, K=Ks, r=rs, T=Ts, gates=gates, backends=backends, status=status,
                objects=objects, base_backend=resolve_backend(None, device),
                device=device, dtype_name=dtype_name, dtype=DTYPES[dtype_name],
                repeats=get("repeats"), warmup=get("warmup"), budget=get("budget"),
                rotate_mb=args.rotate_mb if args.rotate_mb is not None else
                (256.0 if device.type == "cuda" else 64.0))


def n_copies(bytes_per_copy: int, rotate_mb: float) -> int:
    return max(1, min(MAX_COPIES, math.ceil(rotate_mb * 2**20 / max(bytes_per_copy, 1))))


def run(argv=None) -> dict:
    """Run the benchmark for command-line ``argv``; returns the result dict written to --out."""
    ap = build_parser()
    argv_list = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv_list)
    c = resolve(ap, args)
    device, dtype = c["device"], c["dtype"]
    esize = torch.empty(0, dtype=dtype).element_size()
    watch = CpuWatch()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    threads = args.threads if device.type == "cpu" else None
    bw = read_bandwidth(device)
    timing = dict(warmup=c["warmup"], repeats=c["repeats"], budget=c["budget"])
    rows, failures, t_start = [], [], time.perf_counter()

    def result_so_far(complete: bool) -> dict:
        return {
            "benchmark": "bench_mixing", "machine": machine_info(), "device": str(device),
            "dtype": c["dtype_name"], "threads": args.threads,
            "config": {"shapes": [p.label for p in c["projs"]], "K": c["K"], "r": c["r"], "T": c["T"],
                       "gates": c["gates"], "backends": c["backends"], "quick": args.quick,
                       "rotate_mb": c["rotate_mb"], "seed": args.seed, "allow_fail": args.allow_fail,
                       **timing},
            "backend_status": {b: {"available": ok, "why": why} for b, (ok, why) in c["status"].items()},
            "check_rule": (f"max|y - y_ref| <= tol * max|y_ref|, y_ref = fp64 x W^T + grouped_lora_ref "
                           f"on the same weights, tol = {TOL[dtype]:g} for {c['dtype_name']}" + (
                               "" if dtype not in ROUNDOFF else
                               f" (naive: max(tol, (4 * active experts + 2) * {ROUNDOFF[dtype]:.3g}), "
                               "for its four roundings per expert)")),
            "cpu_t1_policy": ("backend.policy: rows of at most the backend's few_rows run "
                              "torch at 1 thread, its kernel or BLAS at --threads"
                              if device.type == "cpu" else None),
            "base_backend": c["base_backend"].name,
            "read_bandwidth_GBps": bw / 1e9, "seconds": time.perf_counter() - t_start,
            "other_cpu_cores": watch.other_cores(), "busy": busy_warning(watch.other_cores()),
            "command": command_line("python benchmarks/bench_mixing.py", argv_list),
            "complete": complete, "rows": rows, "failures": failures, "ok": complete and not failures}

    try:
        with torch.inference_mode():
            for pi, p in enumerate(c["projs"]):
                rows += bench_proj(p, pi, c, args.seed, esize, bw, threads, timing, failures)
                if pi + 1 < len(c["projs"]):   # a run cut short (a lent GPU's time) keeps its rows
                    write_json(args.out, result_so_far(complete=False))
    finally:
        torch.set_num_threads(threads_before)
    result = result_so_far(complete=True)
    write_json(args.out, result)
    table = markdown(result)
    print(table)
    if args.md:
        os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
        with open(args.md, "w") as f:
            f.write(table + "\n")
    if args.plots:
        result["plots"] = draw_plots(result, args.plots)
    print(f"\nwrote {args.out}  ({result['seconds']:.1f} s)")
    return result


def bench_proj(p: Proj, pi: int, c: dict, seed: int, esize: int, bw: float, threads, timing,
               failures: list) -> list[dict]:
    """Every (K, r, T, gates, backend) row of one projection."""
    device, dtype = c["device"], c["dtype"]
    w_bytes = p.d_out * p.d_in * esize
    weights = [(torch.randn(p.d_out, p.d_in, generator=_gen(seed, pi, "w", i)) / math.sqrt(p.d_in))
               .to(device, dtype) for i in range(n_copies(w_bytes, c["rotate_mb"]))]
    base = [Linear(w, None, p.splits, p.modules, c["base_backend"]) for w in weights]   # no experts
    # [T, 1, d_in]: T sequences with one new token each, a decode step (the engine's hot path)
    xs = {T: [torch.randn(T, 1, p.d_in, generator=_gen(seed, pi, "x", T, i)).to(device, dtype)
              for i in range(N_INPUTS)] for T in c["T"]}
    ctx = dict(p=p, c=c, xs=xs, esize=esize, w_bytes=w_bytes, bw=bw, threads=threads, timing=timing,
               failures=failures, base=base, base_cache={},
               base64={T: v[0].double() @ weights[0].double().t() for T, v in xs.items()})
    out = []
    for K in c["K"]:
        for r in c["r"]:
            gen = _gen(seed, pi, "e", K, r)
            all_experts = K * r * (len(p.modules) * p.d_in + p.d_out) * esize
            lins, loras0 = [], None
            for i in range(n_copies(w_bytes + all_experts, c["rotate_mb"])):
                loras = make_experts(p, K, r, gen, dtype, device)
                loras0 = loras0 or loras
                lin = Linear(weights[i], None, p.splits, p.modules, c["base_backend"])
                lin.attach(loras, K)
                lins.append(lin)
            ref = loras0                     # copy 0's experts: the check calls copy 0
            for T in c["T"]:
                for kind in c["gates"]:
                    if kind != "dense" and K < 3:
                        continue
                    gen_g = _gen(seed, pi, "g", kind, K, T)
                    g = make_gates(kind, T, K, gen_g).to(device)
                    if kind == "regather":
                        ctx["g2"] = other_pair(g, gen_g)
                    if kind == "token-router":
                        from pf_engine.persona.router import TokenRouter
                        ctx["router"] = TokenRouter.random(K, p.d_in, 1, top_k=2,
                                                           seed=zlib.crc32(repr((seed, pi, K)).encode())).to(device)
                    out += bench_row(ctx, K, r, T, kind, g, lins, ref, xs[T])
            del lins, ref
    return out


def _threads_label(threads, T: int, backend) -> str:
    """How the row's threads ran: ``backend`` the Backend timed (None: F.linear)."""
    if threads is None:
        return f"torch {torch.get_num_threads()} (host)"
    if backend is not None and T <= backend.few_rows:
        return f"backend.policy: torch 1, {backend.name} {threads}"
    return f"torch {threads}"


def check(y: torch.Tensor, ref: torch.Tensor, tol: float) -> tuple[bool, float]:
    """(passed, max |y - ref| / max |ref|) under the rule in the module docstring."""
    err = (y.double() - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-30)
    return bool(math.isfinite(err) and err <= tol * scale), err / scale


def reference(ctx: dict, T: int, loras: dict, g: torch.Tensor) -> torch.Tensor:
    """fp64 y_ref [T, 1, d_out] for copy 0 and input 0: x W^T plus, per projection, grouped_lora_ref
    of its experts (independent of every backend's code)."""
    p = ctx["p"]
    x = ctx["xs"][T][0].reshape(T, p.d_in)
    y = ctx["base64"][T].reshape(T, p.d_out).clone()
    o = 0
    for m, d_out in zip(p.modules, p.splits):
        lw = loras[m]
        y[:, o:o + d_out] += grouped_lora_ref(x, lw.a, lw.b, g[:, lw.expert_ids], lw.rank_offsets.cpu(),
                                              torch.full((len(lw.expert_ids),), SCALING, device=x.device))
        o += d_out
    return y.reshape(T, 1, p.d_out)


def mixes(ctx: dict, kind: str, g: torch.Tensor, T: int, nl: int, xs):
    """backend -> (call index i -> the Mix that call uses), as the engine builds it for ``kind``."""
    if kind == "token-router":
        router, rows = ctx["router"], torch.ones(T, dtype=torch.bool, device=g.device)
        return lambda b: (lambda i: Mix(g, router, rows).enter_layer(0, xs[i % N_INPUTS]))
    if kind == "regather":                     # the pair changes on each visit to a copy
        pair = (g, ctx["g2"].to(g.device))
        return lambda b: (lambda i: Mix(pair[(i // nl) % 2]))
    return lambda b: (lambda i, m=Mix(g): m)


def bench_row(ctx: dict, K: int, r: int, T: int, kind: str, g: torch.Tensor, lins, ref, xs) -> list:
    """The rows of one (projection, K, r, T, gates) configuration, one per backend."""
    p, c, esize, threads = ctx["p"], ctx["c"], ctx["esize"], ctx["threads"]
    dtype, tol = c["dtype"], TOL[c["dtype"]]
    base, nb, nl = ctx["base"], len(ctx["base"]), len(lins)
    mix_of = mixes(ctx, kind, g, T, nl, xs)                  # backend -> (call i -> Mix)
    g_check = mix_of("naive")(0).gates                        # the gates call 0 uses
    active = Mix(g_check).active
    acts = T * (p.d_in + p.d_out) * esize
    mix_bytes = ctx["w_bytes"] + expert_bytes(lins[0], active, esize) + acts + g.numel() * 4
    y_ref = reference(ctx, T, ref, g_check)
    rows, ms_of = [], {}
    for b in c["backends"]:
        row = dict(shape=p.label, d_in=p.d_in, d_out=p.d_out, K=K, r=r, T=T, gates=kind, backend=b,
                   active_experts=len(active) if b not in ("base", "F.linear") else 0,
                   copies=nb if b in ("base", "F.linear") else nl,
                   threads=_threads_label(threads, T, None if b == "F.linear" else
                                          c["base_backend"] if b == "base" else c["objects"][b]))
        if b in ("base", "F.linear"):
            nbytes = ctx["w_bytes"] + acts
            key = (b, T, K, r)            # timed once per configuration, beside its backends
            if key not in ctx["base_cache"]:
                w_fn = ((lambda i: base[i % nb].full(xs[i % N_INPUTS])) if b == "base" else
                        (lambda i: F.linear(xs[i % N_INPUTS], base[i % nb].weight)))
                ctx["base_cache"][key] = measure(w_fn, ctx["base64"][T].reshape(T, 1, -1), tol, T, ctx,
                                                 None if b == "F.linear" else c["base_backend"])
            res = ctx["base_cache"][key]
        else:
            nbytes = mix_bytes
            mix_i = mix_of(b)
            tol_b = tol if b != "naive" or dtype not in ROUNDOFF else \
                max(tol, (4 * len(active) + 2) * ROUNDOFF[dtype])
            for lin in lins:                       # the backend under test prepares its state
                lin.bind(c["objects"][b])
            res = measure(lambda i: lins[i % nl].full(xs[i % N_INPUTS], mix_i(i)), y_ref, tol_b, T, ctx,
                          c["objects"][b])
        row.update(res)
        row.update(tol=tol if b in ("base", "F.linear") else tol_b, bytes=nbytes, floor_ms=1e3 * nbytes / ctx["bw"])
        row.update({k: row.get(k) for k in ("calls", "GBps", "floor_frac", "ratio_to_base",
                                            "naive_over_this")})      # every row has every field
        if row["status"] != "ok":
            err = row["max_err_rel"]
            ctx["failures"].append(f"{p.label} K={K} r={r} T={T} {kind} {b}: {row['status']}" + (
                "" if err is None else f" (max err {err:.2e} of max|y_ref| > tol {row['tol']:.3g})"))
        else:
            ms_of[b] = row["ms"]
            row["GBps"] = nbytes / (row["ms"] / 1e3) / 1e9
            row["floor_frac"] = row["floor_ms"] / row["ms"]
        rows.append(row)
    for row in rows:
        if row["status"] == "ok":
            row["ratio_to_base"] = row["ms"] / ms_of["base"] if "base" in ms_of else None
            row["naive_over_this"] = ms_of["naive"] / row["ms"] if "naive" in ms_of else None
    return rows


def measure(fn, y_ref, tol: float, T: int, ctx: dict, backend) -> dict:
    """Check fn(0) against y_ref, then time it (not timed when the check fails), under the
    engine's thread policy for ``backend`` (None: F.linear, torch's threads as set)."""
    device = ctx["c"]["device"]
    few = backend is not None and T <= backend.few_rows
    with (backend.policy if backend is not None else ThreadPolicy()).forward(device, few):
        try:
            ok, err = check(fn(0), y_ref, tol)
        except Exception as e:  # noqa: BLE001 - a backend that raises is a failed row, not a crash
            return dict(status=f"FAILED run: {type(e).__name__}: {e}".splitlines()[0],
                        max_err_rel=None, ms=None)
        if not ok:
            return dict(status="FAILED check", max_err_rel=err, ms=None)
        s, n = median_time(fn, device, **ctx["timing"])
    return dict(status="ok", max_err_rel=err, ms=1e3 * s, calls=n)


def main(argv=None) -> int:
    result = run(argv)
    if result["failures"]:
        print(f"{len(result['failures'])} row(s) failed the check against naive; see above",
              file=sys.stderr)
        return 0 if result["config"]["allow_fail"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
