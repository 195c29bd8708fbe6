"""The cpu backend's section of benchmarks/RESULTS.md (issue 12's goals), from cpu_mixing.json and
cpu_generate.json: python benchmarks/bench_mixing.py --shapes smollm2 --K 10 --r 16 --T 1,4
--gates dense,top2 --out benchmarks/results/cpu_mixing.json, and python
benchmarks/bench_generate.py --configs base,top2:cpu,top2:torch,dense:cpu,dense:torch,dense:naive
--new-tokens 32 --repeats 3 --out benchmarks/results/cpu_generate.json.  Every figure computed."""
from __future__ import annotations

import os


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def op_goals(mix: dict) -> list[str]:
    """Summed over SmolLM2's four projection groups at T = 1, K = 10, r = 16."""
    def total(backend, gates):
        rows = [r for r in mix["rows"] if r["T"] == 1 and r["K"] == 10 and r["backend"] == backend
                and r["gates"] in gates and r.get("ms") is not None and r["shape"].startswith("smollm2/")]
        return sum(r["ms"] for r in rows) / max(1, len({r["gates"] for r in rows})), len(rows)
    out = []
    base, n = total("base", ("dense",))
    if not n:
        return out
    for name, gates, goal in (("dense", ("dense",), 1.4), ("top-2", ("top2-seq", "top2-token"), 1.1)):
        cpu, k = total("cpu", gates)
        naive, _ = total("naive", gates)
        if k:
            nv = (f"goal >= 5: {_met(naive / cpu >= 5)}" if name == "dense" else
                  "the loop runs only the two active experts")
            out.append(f"- op level, {name} over 10 experts (T = 1, r = 16, the four SmolLM2 groups "
                       f"summed): cpu {cpu:.3f} ms = {cpu / base:.2f}x the base GEMV {base:.3f} ms "
                       f"(goal <= {goal}: {_met(cpu / base <= goal)}); naive {naive / cpu:.1f}x slower "
                       f"than cpu ({nv}).")
    return out


def e2e_goals(gen: dict) -> list[str]:
    from benchmarks.report.common import row as _row
    out = []
    base = _row(gen, "pf_engine", "base")
    if not base:
        return out
    b = base["decode_ms_per_token"]
    for cfg, goal in (("top2", 1.15), ("dense", 1.5)):
        r, t = _row(gen, "pf_engine", cfg, "cpu"), _row(gen, "pf_engine", cfg, "torch")
        if r:
            vs = f"; torch backend {t['decode_ms_per_token']:.1f} ms" if t else ""
            out.append(f"- end to end, {cfg} persona on cpu: {r['decode_ms_per_token']:.1f} ms/token = "
                       f"{r['decode_ms_per_token'] / b:.2f}x base {b:.1f} ms (goal <= {goal}: "
                       f"{_met(r['decode_ms_per_token'] / b <= goal)}){vs}.")
    hf = _row(gen, "transformers", "base")
    if hf:
        out.append(f"- base decode {hf['decode_ms_per_token'] / b:.2f}x faster than transformers' "
                   f"({hf['decode_ms_per_token']:.1f} ms) (goal >= 2: {_met(hf['decode_ms_per_token'] / b >= 2)}).")
    if base.get("floor_ms_per_token"):
        f = b / base["floor_ms_per_token"]
        out.append(f"- base step {f:.2f}x its read floor ({base['floor_ms_per_token']:.1f} ms) "
                   f"(goal <= 1.4: {_met(f <= 1.4)}).")
    out.append("- against llama.cpp: not measured (the optional peer, llama-cpp-python, is not "
               "installed here).")
    return out


def cpu_section(results_dir: str) -> list[str]:
    from benchmarks import bench_generate, bench_mixing
    from benchmarks.report.common import load, provenance
    mix = load(os.path.join(results_dir, "cpu_mixing.json"))
    gen = load(os.path.join(results_dir, "cpu_generate.json"))
    if not mix and not gen:
        return []
    parts = ["## The cpu backend (csrc/cpu) against its goals", ""]
    if gen:
        parts += [f"`{gen['command'].strip()}`; {provenance(gen['machine'])}.", "",
                  bench_generate.markdown(gen), ""]
    if mix:
        parts += [f"`{mix['command'].strip()}`; {provenance(mix['machine'])}.", "",
                  bench_mixing.markdown(mix), ""]
    bullets = (op_goals(mix) if mix else []) + (e2e_goals(gen) if gen else [])
    return parts + (["Goals (issue 12):", ""] + bullets + [""] if bullets else [])
