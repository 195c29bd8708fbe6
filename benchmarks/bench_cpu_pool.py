"""One token's decoder blocks on CPU, the typed BlockPlan (own thread pool) against the old five
OpenMP calls per block, on a quiet machine and beside busy processes.

    python benchmarks/bench_cpu_pool.py                       # the full table, ~5-10 min on 2 cores
    python benchmarks/bench_cpu_pool.py --quick               # B=1, base and top-2, ~2 min
    python benchmarks/bench_cpu_pool.py --scenarios quiet --spin-us 0,20,50,200   # tuning

The question: does a decode step survive a shared machine?  The engine's goal: at most 2.5x
slower beside two ``nice -n 19`` busy processes and 3x beside one normal-priority busy process,
compared with the same code on the quiet machine in the same run; and quietly, the new path no
slower than the old.

Model: SmolLM2-135M's shapes (d 576, 9 heads, 3 kv heads of 64, intermediate 1536), --layers
blocks in a row (30: one token), random fp32 weights, distinct per layer so they stream from
memory as in a real decode step.  Experts: K=10 of rank 16 on all seven projections (q, k, v, o,
gate, up, down); gates "none" (the base model: experts skipped), "top2" (two experts per row)
or "dense" (all ten).  B rows (slots 0..B-1 of a slot cache) attend over L=64 columns.

Paths, same weights, caches and inputs:
  new  BlockPlan.step per block (pf_kernels.cpu_ops), numpy views of the torch tensors
  old  pf_engine/backends/cpu/decode.py's five raw-pointer calls per block (fused_linear_pe x4,
       decode_attention), with its per-call Python work (torch.empty outputs, gates.contiguous,
       the layer's cache views), not the engine's other per-layer work (Mix.for_layer)
Both run ``--threads`` threads (the caller included); torch itself at one thread, as the
engine's decode steps run.  A check first: one token of each path from the same state agrees.

Scenarios: quiet; nice2: two ``nice -n 19`` busy loops, each in its own session (setsid:
the kernel's autogroup scheduler gives each session its own share, so nice does not shield
us); busy1: one normal-priority busy loop in its own session.  Busy loops end by themselves
after --busy-limit seconds and are killed (their process group) in a finally.

Timing: per (scenario, configuration) the paths alternate in blocks of --block tokens (so a load
swing hits both), --switch-gap-ms of sleep before each block (libgomp's threads spin ~10 ms
after their last region: without the gap the old path's would still hold a core during the new
path's next token) and --gap-ms before each token (the engine's sampling between tokens);
--warmup tokens, then up to --reps tokens within --budget seconds per path (at least 3); the
median ms/token.  Ratios: busy/quiet per path,
new/old per scenario.  The table prints; --out writes JSON (default under /tmp).
"""
from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import CpuWatch, machine_info, write_json  # noqa: E402

D_MODEL, H, H_KV, D, F = 576, 9, 3, 64, 1536
K, RANK, L_COLS, MAX_LEN = 10, 16, 64, 128
EPS = 1e-5
PRO_NONE, PRO_RMSNORM, PRO_SILU_MUL = 0, 1, 2
GROUPS = {"qkv": (D_MODEL, (H * D, H_KV * D, H_KV * D)), "o": (H * D, (D_MODEL,)),
          "gate_up": (D_MODEL, (F, F)), "down": (F, (D_MODEL,))}


def lists(cast):
    return lambda s: [cast(v) for v in s.split(",") if v]


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--B", type=lists(int), default=[1, 4])
    ap.add_argument("--gates", type=lists(str), default=["none", "top2", "dense"])
    ap.add_argument("--scenarios", type=lists(str), default=["quiet", "nice2", "busy1"])
    ap.add_argument("--paths", type=lists(str), default=["old", "new"])
    ap.add_argument("--spin-us", type=lists(int), default=None,
                    help="pool spin times to compare (new path; default: the module's)")
    ap.add_argument("--pass1-bytes", type=lists(int), default=None, help="LinearPlan pass-1 chunk sizes")
    ap.add_argument("--pass2-bytes", type=lists(int), default=None, help="LinearPlan pass-2 chunk sizes")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget", type=float, default=12.0, help="seconds per path and row")
    ap.add_argument("--gap-ms", type=float, default=2.0, help="sleep before each token")
    ap.add_argument("--block", type=int, default=4, help="tokens per path before switching")
    ap.add_argument("--switch-gap-ms", type=float, default=40.0, help="sleep before switching path")
    ap.add_argument("--busy-limit", type=float, default=900.0, help="busy loops end after this many s")
    ap.add_argument("--wait-quiet", type=float, default=120.0,
                    help="before each scenario, wait up to this many s for other processes to "
                         "use under 0.2 cores (a shared machine); 0: do not wait")
    ap.add_argument("--quick", action="store_true", help="B=1, gates none,top2, 9 reps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/bench_cpu_pool.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.B, args.gates, args.reps = [1], ["none", "top2"], 9
    return args


# ---------------------------------------------------------------------------------------------
# The model: weights, experts, both paths' metadata
# ---------------------------------------------------------------------------------------------

class Group:
    """One projection group of one layer: W_aug = [W; A_cat] with K experts of rank RANK on
    every part; the typed plan and the old path's metadata over the same tensors."""

    def __init__(self, d_in, sizes, g, mod, cpu_ops):
        self.d_in, self.d_out = d_in, sum(sizes)
        R = K * RANK * len(sizes)
        self.w_aug = torch.randn(self.d_out + R, d_in, generator=g) / d_in ** 0.5
        self.bT = [torch.randn(K * RANK, dp, generator=g) * 0.02 for dp in sizes]
        parts, blocks, old_parts, old_blocks, out0 = [], [], [], [], 0
        for p, dp in enumerate(sizes):
            r0 = p * K * RANK
            j0 = len(old_blocks)
            for e in range(K):
                blocks.append((p, e, r0 + e * RANK, r0 + (e + 1) * RANK, 2.0))
                old_blocks.append((e, r0 + e * RANK, r0 + (e + 1) * RANK))
            parts.append((out0, out0 + dp, r0, r0 + K * RANK, self.bT[p].numpy()))
            old_parts.append((out0, out0 + dp, r0, r0 + K * RANK, j0, len(old_blocks)))
            out0 += dp
        self.plan = cpu_ops.LinearPlan(self.w_aug.numpy(), self.d_out, None, parts, blocks, K)
        # the old path (decode.py's _static / backends.Cpu.meta)
        self.meta = {"parts": torch.tensor(old_parts, dtype=torch.int64),
                     "bptrs": torch.tensor([b.data_ptr() for b in self.bT], dtype=torch.int64),
                     "blocks": torch.tensor(old_blocks, dtype=torch.int64),
                     "scale": torch.full((len(old_blocks),), 2.0)}
        m, e = self.meta, cpu_ops.empty_meta()
        self.base = ((self.w_aug.data_ptr(), self.d_out, 0, 0),
                     (e["parts"].data_ptr(), e["bptrs"].data_ptr(), 0, e["blocks"].data_ptr(),
                      e["scale"].data_ptr(), 0), e["gates"].data_ptr())
        self.mixed = ((self.w_aug.data_ptr(), self.d_out, R, 0),
                      (m["parts"].data_ptr(), m["bptrs"].data_ptr(), len(old_parts),
                       m["blocks"].data_ptr(), m["scale"].data_ptr(), len(old_blocks)))
        self.mod = mod

    def old(self, x2, gates, threads, pro=PRO_NONE, pro_w=None, residual=None):
        """decode.py's linear(): y [B, d_out] from x2 [B, d_in'] by one fused_linear_pe call."""
        B = x2.shape[0]
        if gates is not None:
            (args, tail), g = self.mixed, gates.contiguous()
            gp, k, gs = g.data_ptr(), g.shape[1], g.stride(0)
        else:
            (args, tail, gp), k, gs = self.base, 1, 0
        y = torch.empty(B, self.d_out, dtype=torch.float32)
        self.mod.fused_linear_pe(
            x2.data_ptr(), B, x2.stride(0), self.d_in, *args, gp, k, gs, y.data_ptr(), self.d_out,
            *tail, threads, pro, 0 if pro_w is None else pro_w.data_ptr(), EPS,
            0 if residual is None else residual.data_ptr(), 0 if residual is None else residual.stride(0))
        return y


class Model:
    def __init__(self, layers, seed):
        from pf_kernels import cpu_ops
        ok, why = cpu_ops.cpu_available()
        if not ok:
            raise SystemExit(f"bench_cpu_pool: csrc/cpu unavailable: {why}")
        self.cpu_ops, self.mod = cpu_ops, cpu_ops._load()[0]
        g = torch.Generator().manual_seed(seed)
        self.layers = []
        for _ in range(layers):
            grp = {n: Group(d_in, sizes, g, self.mod, cpu_ops) for n, (d_in, sizes) in GROUPS.items()}
            norms = (1 + 0.1 * torch.randn(D_MODEL, generator=g), 1 + 0.1 * torch.randn(D_MODEL, generator=g))
            plan = cpu_ops.BlockPlan(grp["qkv"].plan, grp["o"].plan, grp["gate_up"].plan,
                                     grp["down"].plan, norms[0].numpy(), norms[1].numpy(), EPS, H, H_KV, D)
            self.layers.append((grp, norms, plan))
        self.k = torch.randn(layers, 4, H_KV, MAX_LEN, D, generator=g) * 0.5
        self.v = torch.randn(layers, 4, H_KV, MAX_LEN, D, generator=g)
        self.g = g

    def inputs(self, B, gates_kind):
        g = self.g
        pos = torch.full((B,), L_COLS - 1, dtype=torch.int64)
        ang = torch.rand(B, 1, D, generator=g) * 6.28
        scale = torch.cat([torch.full((H,), D ** -0.5), torch.ones(H_KV)]).view(1, H + H_KV, 1)
        cos = (ang.cos() * scale).contiguous()
        sin = (ang.sin() * scale).contiguous()
        bias = torch.zeros(B, L_COLS)
        gates = None
        if gates_kind == "dense":
            gates = torch.rand(B, K, generator=g).softmax(-1)
        elif gates_kind == "top2":
            gates = torch.zeros(B, K)
            for b in range(B):
                gates[b, torch.randperm(K, generator=g)[:2]] = torch.tensor([0.6, 0.4])
        x = torch.randn(B, D_MODEL, generator=g)
        return dict(x=x, gates=gates, cos=cos, sin=sin, bias=bias, cols=pos)

    def token_new(self, h, inp, threads):
        """h [B, d] numpy (a view of a torch tensor), updated in place through every layer."""
        g = None if inp["gates"] is None else inp["gates"].numpy()
        cos, sin, bias, cols = (inp[n].numpy() for n in ("cos", "sin", "bias", "cols"))
        k, v = self.k.numpy(), self.v.numpy()
        for layer, (_, _, plan) in enumerate(self.layers):
            plan.step(h, g, cos, sin, k, v, layer, 0, cols, bias, threads)

    def token_old(self, x2, inp, threads):
        """decode.py's block_step through every layer: x2 [B, d] torch -> the output."""
        B = x2.shape[0]
        gates = inp["gates"]
        cos, sin, bias, cols = inp["cos"], inp["sin"], inp["bias"], inp["cols"]
        for layer, (grp, (attn_norm, mlp_norm), _) in enumerate(self.layers):
            qkv = grp["qkv"].old(x2, gates, threads, PRO_RMSNORM, attn_norm)
            k, v = self.k[layer], self.v[layer]
            a = torch.empty(B, H * D, dtype=torch.float32)
            self.mod.decode_attention(qkv.data_ptr(), B, qkv.stride(0), H, H_KV, D, cos.data_ptr(),
                                      sin.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0),
                                      k.stride(1), 0, cols.data_ptr(), L_COLS, bias.data_ptr(),
                                      bias.shape[-1], a.data_ptr(), threads)
            x2 = grp["o"].old(a, gates, threads, residual=x2)
            gu = grp["gate_up"].old(x2, gates, threads, PRO_RMSNORM, mlp_norm)
            x2 = grp["down"].old(gu, gates, threads, PRO_SILU_MUL, residual=x2)
        return x2


# ---------------------------------------------------------------------------------------------
# Busy neighbours
# ---------------------------------------------------------------------------------------------

SCENARIOS = {"quiet": [], "nice2": [19, 19], "busy1": [0]}


def wait_quiet(max_wait: float, threshold: float = 0.2) -> float | None:
    """Waits (1 s windows, at most max_wait s) until other processes keep under ``threshold``
    cores busy; returns the last window's figure."""
    end = time.time() + max_wait
    while True:
        watch = CpuWatch()
        time.sleep(1.0)
        other = watch.other_cores()
        if other is None or other < threshold or time.time() >= end:
            return other


class Neighbours:
    """Busy loops, each in its own session (its own autogroup), at the given nice values; they
    stop by themselves after ``limit`` seconds and are killed on exit."""

    def __init__(self, nices, limit):
        self.procs = []
        code = f"import time\nt = time.time() + {limit}\nwhile time.time() < t: pass"
        for n in nices:
            self.procs.append(subprocess.Popen(["nice", "-n", str(n), sys.executable, "-c", code],
                                               start_new_session=True))
        if self.procs:
            time.sleep(0.5)                      # let the scheduler settle

    def close(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
        self.procs = []


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def check(model, threads) -> float:
    """Max |new - old| relative to max |old| after one token from the same state (caches too)."""
    worst = 0.0
    for kind in ("none", "dense"):
        inp = model.inputs(2, kind)
        k0, v0 = model.k.clone(), model.v.clone()
        want = model.token_old(inp["x"].clone(), inp, threads)
        k_old, v_old = model.k.clone(), model.v.clone()
        model.k.copy_(k0)
        model.v.copy_(v0)
        h = inp["x"].clone()
        model.token_new(h.numpy(), inp, threads)
        for a, b in ((h, want), (model.k, k_old), (model.v, v_old)):
            worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
    return worst


def time_row(model, B, kind, paths, args, variant_setup):
    """Median ms/token of each path: blocks of --block tokens, the paths alternating block by
    block after --switch-gap-ms of sleep (OpenMP's threads spin ~10 ms after their last region
    here: the old path's would steal a core from the new one's next token)."""
    inp = model.inputs(B, kind)
    state = {p: inp["x"].clone() for p in paths}
    runs = {"old": lambda: state.__setitem__("old", model.token_old(inp["x"], inp, args.threads)),
            "new": lambda: model.token_new(state["new"].copy_(inp["x"]).numpy(), inp, args.threads)}
    samples = {p: [] for p in paths}
    seen = {p: 0 for p in paths}
    spent = {p: 0.0 for p in paths}

    def wanted(p):
        return seen[p] < args.warmup + args.reps and (len(samples[p]) < 3 or spent[p] <= args.budget)

    while any(wanted(p) for p in paths):
        for p in paths:
            if not wanted(p):
                continue
            variant_setup(p)
            time.sleep(args.switch_gap_ms / 1000)
            for _ in range(args.block):
                if not wanted(p):
                    break
                time.sleep(args.gap_ms / 1000)
                t = time.perf_counter()
                runs[p]()
                dt = time.perf_counter() - t
                seen[p] += 1
                if seen[p] > args.warmup:
                    samples[p].append(dt * 1000)
                    spent[p] += dt
    return {p: {"ms": statistics.median(s), "n": len(s), "samples": [round(v, 3) for v in s]}
            for p, s in samples.items()}


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    print(f"building {args.layers} layers of SmolLM2-135M shapes with K={K} rank-{RANK} experts ...",
          file=sys.stderr)
    model = Model(args.layers, args.seed)
    cpu_ops = model.cpu_ops
    err = check(model, args.threads)
    print(f"check: new vs old after one token, max rel diff {err:.2e}", file=sys.stderr)
    if err > 1e-4:
        print("bench_cpu_pool: error: the paths disagree", file=sys.stderr)
        return 1
    default_chunks = model.mod._chunking()
    spins = args.spin_us or [cpu_ops.spin_us()]
    p1s = args.pass1_bytes or [default_chunks["pass1_bytes"]]
    p2s = args.pass2_bytes or [default_chunks["pass2_bytes"]]
    variants = list(itertools.product(spins, p1s, p2s))

    rows, t0 = [], time.time()
    for scen in args.scenarios:
        before = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
        if before is not None and before >= 0.2:
            print(f"  warning: other processes keep {before:.2f} cores busy before {scen}", file=sys.stderr)
        nb = Neighbours(SCENARIOS[scen], args.busy_limit)
        try:
            watch = CpuWatch()
            for kind, B in itertools.product(args.gates, args.B):
                for vi, (spin, p1, p2) in enumerate(variants):
                    paths = [p for p in args.paths if p == "new" or vi == 0]

                    def setup(path, spin=spin, p1=p1, p2=p2):
                        if path == "new":
                            cpu_ops.set_spin_us(spin)
                            model.mod._set_chunking(p1, p2)

                    for attempt in range(3):          # a quiet row that was not quiet: again
                        row_watch, c0 = CpuWatch(), model.mod._contention()
                        got = time_row(model, B, kind, paths, args, setup)
                        row_other = row_watch.other_cores()
                        c1 = model.mod._contention()
                        signs, windows = c1["signs"] - c0["signs"], c1["windows"] - c0["windows"]
                        if SCENARIOS[scen] or row_other is None or row_other < 0.2 or attempt == 2:
                            break
                        print(f"  (others kept {row_other:.2f} cores busy: measuring again)", file=sys.stderr)
                        wait_quiet(args.wait_quiet)
                    row = dict(scenario=scen, gates=kind, B=B, spin_us=spin, pass1_bytes=p1,
                               pass2_bytes=p2, row_other_cores=row_other, contention_signs=signs, inline_windows=windows, **{f"{p}_ms": got[p]["ms"] for p in got},
                               **{f"{p}_samples": got[p]["samples"] for p in got})
                    rows.append(row)
                    print(f"  {scen:6s} {kind:5s} B={B} spin={spin} p1={p1} p2={p2}: " +
                          "  ".join(f"{p} {got[p]['ms']:.1f} ms" for p in got) +
                          f"  (shared-machine signs {signs}, inline windows {windows})", file=sys.stderr)
            other = watch.other_cores()
        finally:
            nb.close()
        for r in rows:
            if r["scenario"] == scen:
                r["other_cores"], r["other_cores_before"] = other, before
    cpu_ops.set_spin_us(spins[0])
    model.mod._set_chunking(default_chunks["pass1_bytes"], default_chunks["pass2_bytes"])
    table = report(rows, args, variants)
    print(table)
    write_json(args.out, {"machine": machine_info(), "args": vars(args), "check_max_rel": err,
                          "seconds": round(time.time() - t0, 1), "rows": rows, "table": table})
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


def report(rows, args, variants) -> str:
    """One line per (gates, B, variant): ms/token per scenario and path, busy/quiet and new/old."""
    def get(scen, kind, B, v, path):
        for r in rows:
            if (r["scenario"], r["gates"], r["B"], r["spin_us"], r["pass1_bytes"], r["pass2_bytes"]) == (scen, kind, B, *v):
                return r.get(f"{path}_ms")
        return None

    def f(v, fmt="{:.1f}"):
        return "-" if v is None else fmt.format(v)

    scen = args.scenarios
    head = ["gates", "B", "spin_us", "pass1_B", "pass2_bytes"]
    for s in scen:
        head += [f"{s} old", f"{s} new", f"{s} new/old"]
    for s in scen[1:]:
        head += [f"{s}/{scen[0]} old", f"{s}/{scen[0]} new"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for kind, B in itertools.product(args.gates, args.B):
        for v in variants:
            cells = [kind, str(B), *map(str, v)]
            old0 = get(scen[0], kind, B, variants[0], "old")
            new0 = get(scen[0], kind, B, v, "new")
            for s in scen:
                o, n = get(s, kind, B, variants[0], "old"), get(s, kind, B, v, "new")
                cells += [f(o), f(n), f(n / o if n and o else None, "{:.2f}")]
            for s in scen[1:]:
                o, n = get(s, kind, B, variants[0], "old"), get(s, kind, B, v, "new")
                cells += [f(o / old0 if o and old0 else None, "{:.2f}x"),
                          f(n / new0 if n and new0 else None, "{:.2f}x")]
            lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"ms per token ({args.layers} blocks), median; threads={args.threads}; "
                 + "; ".join(f"{s}: other processes kept "
                             f"{next((r['other_cores'] for r in rows if r['scenario'] == s), 0) or 0:.2f} cores busy"
                             for s in scen))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
