"""bench_cpu's persona rows: the experts in each format (backends/cpu/experts.py) on the bundled
4-bit model, timed beside the base model, their accuracy against fp32 experts, and what a user
sees (greedy replies under each format beside the base model's).

Banks: ``rank16``, a seeded random bank of ten rank-16 experts on all seven projections (the
one llama.cpp also runs, converted to LoRA GGUFs), and ``bigfive``, the shipped bank (rank 8, five
projections).  Personas: top2 = {first: 0.7, second: 0.3}; dense10 = 0.1 on each of the ten.

Accuracy, per bank, persona kind and format: the largest logit error over the prompt's positions
relative to the largest logit, against the same engine with fp32 experts, on the 4-bit model and
on its fp32 copy; beside it the noise floor: how far the fp32-expert engine itself moves when its
gates are scaled by 1.001 (on the 4-bit model activations are quantized per block, so any change
rounds later layers' activations differently).  And how many prompts give the same 16 greedy
tokens as fp32 experts.
"""
from __future__ import annotations

FORMATS = ("f32", "bf16", "q8")
DEFAULT = "q8"                         # what auto picks on the 4-bit model (experts.choose)


def personas(names: list[str]) -> dict:
    return {"top2": {names[0]: 0.7, names[1]: 0.3}, "dense10": {n: 0.1 for n in names}}


def engines(path: str, banks: dict, fmts=FORMATS, **kw) -> dict:
    """{(bank, fmt): Engine} on the GGUF at ``path``, prefix cache off, EOS ignored."""
    from pf_engine import Engine
    from benchmarks.common import no_prefix_cache
    out = {}
    for b, bank in banks.items():
        for f in fmts:
            e = no_prefix_cache(Engine.from_pretrained(path, adapters=bank, expert_format=f, progress=False, **kw))
            e.eos_ids = set()
            out[b, f] = e
    return out


def expert_bytes(eng, fmt: str, experts: set[str]) -> int:
    """Bytes of the active experts a decode step reads in ``fmt`` (backends/cpu/experts.py):
    each adapted Linear's A_cat rows and B of the blocks whose expert is in ``experts``."""
    from pf_kernels.quant import FORMATS
    names = list(eng.bank.expert_names)
    total = 0
    for blk in eng.model.blocks:
        for lin in blk.linears:
            for p in lin.parts:
                dp = p.out1 - p.out0
                for e, r0, r1, _ in p.layout.blocks:
                    if names[e] not in experts:
                        continue
                    n = r1 - r0
                    if fmt == "q8":
                        total += n * FORMATS["q8_0"].row_bytes(lin.d_in) + -(-dp // 8) * (4 + 32 * -(-n // 4))
                    else:
                        w = 4 if fmt == "f32" else 2
                        total += n * w * lin.d_in + n * w * (dp if fmt == "f32" else -(-dp // 32) * 32)
    return total


def timed_rows(engs: dict, ours, ids, n: int) -> list:
    """(row spec, fn) for every bank x format x persona; the spec carries the experts' bytes a
    step reads (``expert_bytes``)."""
    rows = []
    for (b, f), e in engs.items():
        for p, spec in personas(list(e.bank.expert_names)).items():
            rows.append(({"engine": "pf_engine", "format": "q4_1", "persona": p, "bank": b, "experts": f,
                          "expert_bytes": expert_bytes(e, f, set(spec))},
                         lambda e=e, spec=spec: ours(e, ids, n, spec)))
    return rows


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


def accuracy(engs: dict, ids: list[int], prompts: list[list[int]], label: str) -> list[dict]:
    """One row per bank x persona kind x low-precision format (see the module doc)."""
    rows = []
    for b in sorted({b for b, _ in engs}):
        ref = engs[b, "f32"]
        names = list(ref.bank.expert_names)
        kinds = dict(personas(names))
        if ref.bank.router is not None:
            kinds["auto"] = "auto"
        for kind, spec in kinds.items():
            want = ref.logits([ids], persona=spec)[0]
            floor = None
            if isinstance(spec, dict):
                floor = _rel(ref.logits([ids], persona={k: v * 1.001 for k, v in spec.items()})[0], want)
            greedy_ref = [ref.generate([p], max_new_tokens=16, persona=spec)[0].token_ids for p in prompts]
            for f in FORMATS[1:]:
                e = engs[b, f]
                same = sum(e.generate([p], max_new_tokens=16, persona=spec)[0].token_ids == g
                           for p, g in zip(prompts, greedy_ref))
                rows.append({"model": label, "bank": b, "persona": kind, "experts": f,
                             "logit_rel_err": _rel(e.logits([ids], persona=spec)[0], want),
                             "gate_1e-3_floor": floor, "greedy16_same": f"{same}/{len(prompts)}"})
    return rows


def samples(base, engs: dict, tok, messages: list[str], n: int = 40) -> list[dict]:
    """Greedy replies to ``messages`` (chat) from the base model and from bigfive's ``auto``
    persona with fp32 and default-format experts."""
    out = []
    for m in messages:
        ids = tok.encode(m, chat=True)
        row = {"message": m, "base": tok.decode(base.generate([ids], max_new_tokens=n)[0].token_ids)}
        for f in ("f32", DEFAULT):
            r = engs["bigfive", f].generate([ids], max_new_tokens=n, persona="auto")[0]
            row[f"auto, {f} experts"] = tok.decode(r.token_ids)
        out.append(row)
    return out


def markdown(result: dict) -> list[str]:
    lines = ["", "Persona experts by format (bundled model, Q4_1; `bank`: rank16 = ten random rank-16 experts on "
             "all seven projections, bigfive = the shipped bank; `auto` picks q8 here):", "",
             "| bank | experts | persona | decode ms/token | x base | bytes read x base |", "|---|---|---|---|---|---|"]
    base = next(r for r in result["rows"] if r["engine"] == "pf_engine" and r["format"] == "q4_1"
                and r["persona"] == "base")["decode_ms_per_token"]
    wb = result.get("weight_bytes", {}).get("q4_1")
    for r in result["rows"]:
        if "experts" in r:
            floor = f"{1 + r['expert_bytes'] / wb:.2f}x" if wb and "expert_bytes" in r else "-"
            lines.append(f"| {r['bank']} | {r['experts']} | {r['persona']} | {r['decode_ms_per_token']:.2f} | "
                         f"{r['decode_ms_per_token'] / base:.2f}x | {floor} |")
    lines += ["", "(bytes read x base: the base weights a step reads plus the active experts' A_cat rows "
              "and B in that format, over the base weights': the ratio a step bound by memory reads "
              "cannot go below.)"]
    acc = result.get("expert_accuracy", [])
    if acc:
        lines += ["", "Accuracy against fp32 experts (largest logit error / largest logit over the prompt; "
                  "floor: the fp32-expert engine's own move when its gates are scaled by 1.001):", "",
                  "| model | bank | persona | experts | logit error | floor | greedy 16 = fp32 experts |",
                  "|---|---|---|---|---|---|---|"]
        for a in acc:
            fl = "-" if a["gate_1e-3_floor"] is None else f"{a['gate_1e-3_floor']:.1e}"
            lines.append(f"| {a['model']} | {a['bank']} | {a['persona']} | {a['experts']} | {a['logit_rel_err']:.1e} | "
                         f"{fl} | {a['greedy16_same']} |")
    for s in result.get("expert_samples", []):
        lines += ["", f"*{s['message']}*", ""]
        lines += [f"- **{k}**: {v.strip()}" for k, v in s.items() if k != "message"]
    return lines
