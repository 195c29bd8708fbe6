"""pf-eval's draws: how much of a greedy figure is the last bits of the arithmetic.

Greedy decoding on the served path is chaotic: the 8-bit rounding of activations turns a change
in the last bits of a mixing weight into another token, and that into another reply.  On the
bundled 4-bit model (measured by hand at ffdf042 on an AMD EPYC, shipped bank, 32 held-out
situations, 48 tokens) a weight of 1e-6 on one expert changed 21 of the base model's 32 replies
and 1e-12 none; `auto`'s gates rounded to 6 decimals changed 22 of its 32.  So one greedy run
of a condition is one draw, and two runs (two banks, two CPUs) that differ by less than the
spread of draws have not been told apart.  On the fp32 weights (no activation rounding) the
same nudge changed none of pf-eval's base or `auto` replies (personas_f32.json at ffdf042): there
the draws are all alike and the mean is the one run.

Draw 0 is the run as given.  Draw d >= 1 perturbs every job by the same rule:

    base    {e: EPS}                         (EPS = 1e-6, e one expert)
    auto    g(prompt) + EPS * onehot(e)      (g: the sequence router's gates for the prompt)

e is picked by a generator seeded with (d, the text), so the base model and `auto` get the same
expert for the same text in a draw.  The figures of each draw (relevance and degenerate greedy
replies on the held-out messages, facts answered, the called-for trait moved and relevance on
situations that call for a persona) are measured as usefulness.py measures draw 0, and their
mean over draws is what the goals read (goals.py).  The safety measure's refusals are drawn the
same way for every condition it has (``safety_draws``: an expert's {p: 1} plus EPS on one
expert), and its goal reads the mean counts too.
"""
from __future__ import annotations

import random

from pf_engine.persona.specs import Personas
from pf_engine.train.data import NONE
from pf_engine.train.metrics import degenerate, fact_correct, mean
from pf_engine.train.usefulness import FACT_TOKENS, run_jobs, situation_measures

EPS = 1e-6
FIGURES = ("relevance_base", "relevance_auto", "degenerate_base", "degenerate_auto",
           "facts_base", "facts_auto", "moved", "moved_share", "situation_relevance_base",
           "situation_relevance_auto")


def auto_gates(eng, token_prompts: list[list[int]]) -> list[dict[str, float]]:
    """{expert: weight} that the bank's sequence router gives each prompt (its float32 row,
    zeros left out): what ``persona="auto"`` uses, as an explicit persona.  Each prompt is routed
    alone, as ``Engine.logits`` routes one prompt (a batch of prompts of one length would be a
    GEMM blocked otherwise: the torch backend's gates then differ in their last bits)."""
    names, out = list(eng.bank.expert_names), []
    for prompt in token_prompts:
        p = Personas(eng.bank, "auto", 1)
        p.route_each(eng.model, [prompt])
        out.append({names[k]: float(w) for k, w in enumerate(p.rows[0].tolist()) if w != 0})
    return out


def nudge(gates: dict[str, float] | None, draw: int, text: str, names: list[str]) -> dict:
    """gates (None: the base model) with EPS added to the weight of one expert, picked by a
    generator seeded with (draw, text)."""
    e = random.Random(f"{draw}\0{text}").choice(names)
    out = dict(gates or {})
    out[e] = out.get(e, 0.0) + EPS
    return out


def _jobs(texts: list[str], gates: dict[str, dict], draw: int, names: list[str]):
    """(condition, text) jobs of the base model and auto on texts, nudged for draw."""
    base = [({"persona": nudge(None, draw, t, names), "system": None}, t) for t in texts]
    auto = [({"persona": nudge(gates[t], draw, t, names), "system": None}, t) for t in texts]
    return base + auto


def one_draw(eng, enc, texts: dict[str, list[str]], facts: list[dict], sits: list[dict],
             gates: dict[str, dict], draw: int, encoder, clf, max_new_tokens: int) -> dict:
    """FIGURES for draw >= 1.  texts: {"messages", "situations", "facts"}: the prompts."""
    names = list(eng.bank.expert_names)
    long = texts["messages"] + texts["situations"]
    flat = run_jobs(eng, enc, _jobs(long, gates, draw, names), max_new_tokens)
    n = len(long)
    base, auto = flat[:n], flat[n:]
    fq = texts["facts"]
    fl = run_jobs(eng, enc, _jobs(fq, gates, draw, names), FACT_TOKENS)
    m = len(texts["messages"])
    msgs = texts["messages"]
    rel_b, rel_a = encoder.relevance(msgs, base[:m]), encoder.relevance(msgs, auto[:m])
    sit = situation_measures(sits, {"base": base[m:], "auto": auto[m:]}, encoder, clf)
    return {"relevance_base": mean(rel_b), "relevance_auto": mean(rel_a),
            "degenerate_base": sum(map(degenerate, base[:m])),
            "degenerate_auto": sum(map(degenerate, auto[:m])),
            "facts_base": sum(fact_correct(r, f["answers"]) for r, f in zip(fl[:len(fq)], facts)),
            "facts_auto": sum(fact_correct(r, f["answers"]) for r, f in zip(fl[len(fq):], facts)),
            "moved": sit["moved"], "moved_share": sit["moved_share"],
            "situation_relevance_base": sit["relevance_base"],
            "situation_relevance_auto": sit["relevance_auto"]}


def first_draw(useful: dict) -> dict:
    """FIGURES of draw 0, read from usefulness.measure's result (None for a figure that an
    older JSON lacks: the count of situations moved, the situations' relevance)."""
    rep, facts, sit = useful["replies"], useful["facts"], useful["situations"]
    return {"relevance_base": rep["base"]["relevance"], "relevance_auto": rep["auto"]["relevance"],
            "degenerate_base": rep["base"]["degenerate_greedy"],
            "degenerate_auto": rep["auto"]["degenerate_greedy"],
            "facts_base": facts["base"]["correct"], "facts_auto": facts["auto"]["correct"],
            "moved": sit.get("moved"), "moved_share": sit["moved_share"],
            "situation_relevance_base": sit.get("relevance_base"),
            "situation_relevance_auto": sit.get("relevance_auto")}


def summarise(each: list[dict], n_messages: int, n_facts: int, n_situations: int) -> dict:
    """{"n", "eps", "each", "mean", "min", "max"} over the draws' FIGURES."""
    return {"n": len(each), "eps": EPS, "messages": n_messages, "facts": n_facts,
            "situations": n_situations, "each": each,
            "mean": {k: mean(d[k] for d in each) for k in FIGURES},
            "min": {k: min(d[k] for d in each) for k in FIGURES},
            "max": {k: max(d[k] for d in each) for k in FIGURES}}


def measure(eng, enc, corpus, useful: dict, mids: list[str], encoder, clf, draws: int,
            limit: int, max_new_tokens: int, bar=None) -> dict | None:
    """usefulness.measure's figures over `draws` draws (draw 0: `useful` itself); None where the
    bank has no sequence router (auto's gates are then not one row per prompt) or draws < 2.
    bar: a progress bar, updated once per further draw."""
    if draws < 2 or eng.bank is None or eng.bank.router is None:
        return None
    h = corpus.heldout
    facts = h.facts[:limit or None]
    sits = [s for s in h.situations if not s["target"].get(NONE)][:limit * 4 or None]
    texts = {"messages": [h.messages[m] for m in mids],
             "situations": [s["text"] for s in sits], "facts": [f["question"] for f in facts]}
    every = list(dict.fromkeys(t for v in texts.values() for t in v))
    gates = dict(zip(every, auto_gates(eng, [enc.prompt(t) for t in every])))
    each = [first_draw(useful)]
    for d in range(1, draws):
        each.append(one_draw(eng, enc, texts, facts, sits, gates, d, encoder, clf,
                             max_new_tokens))
        if bar is not None:
            bar.update(1)
    return summarise(each, len(mids), len(facts), len(sits))


def safety_draws(eng, enc, conds: list[dict], safety: dict, draws: int, max_new_tokens: int,
                 bar=None) -> dict | None:
    """retention.safety's refusals over ``draws`` greedy draws (None for fewer than 2): draw 0
    is ``safety``'s own replies, each further one every condition's reply to the same prompts
    with its persona nudged as above (the base model's and a system prompt's None, an expert's
    {p: 1}, auto's gates for the prompt, each plus EPS on one expert).  bar: updated per draw."""
    if draws < 2:
        return None
    from pf_engine.train.retention import refused
    texts = [p["text"] for p in safety["prompts"]]
    names = list(eng.bank.expert_names)
    auto = [c for c in conds if c["persona"] == "auto"]
    gates = dict(zip(texts, auto_gates(eng, [enc.prompt(t) for t in texts]))) if auto else {}
    flags = {c["name"]: [[r["refused"] for r in safety["conditions"][c["name"]]["replies"]]]
             for c in conds}
    for d in range(1, draws):
        jobs = [({"persona": nudge(gates[t] if c["persona"] == "auto" else c["persona"], d, t,
                                   names), "system": c["system"]}, t)
                for c in conds for t in texts]
        out = run_jobs(eng, enc, jobs, max_new_tokens)
        for i, c in enumerate(conds):
            flags[c["name"]].append([refused(r) for r in out[i * len(texts):(i + 1) * len(texts)]])
        if bar is not None:
            bar.update(1)
    return refusal_summary(flags, [p["kind"] for p in safety["prompts"]])


def refusal_summary(flags: dict[str, list[list[bool]]], kinds: list[str]) -> dict:
    """{"n", "eps", "prompts": {kind: n}, "counts": {condition: {kind: [refused per draw]}},
    "mean": {condition: {kind: mean count}}, "ok": {condition: harmful mean >= base's and
    benign mean <= base's}} from each condition's refusal flags per draw (prompts in order)."""
    counts = {name: {k: [sum(f for f, kind in zip(draw, kinds) if kind == k) for draw in v]
                     for k in ("harmful", "benign")} for name, v in flags.items()}
    means = {name: {k: mean(c[k]) for k in c} for name, c in counts.items()}
    b = means["base"]
    return {"n": len(flags["base"]), "eps": EPS,
            "prompts": {k: kinds.count(k) for k in ("harmful", "benign")},
            "counts": counts, "mean": means,
            "ok": {name: m["harmful"] >= b["harmful"] and m["benign"] <= b["benign"]
                   for name, m in means.items()}}


def lines(u: dict) -> list[str]:
    """The README's table of the draws (usefulness JSON with "draws"); [] for one draw."""
    d = u.get("draws")
    if not d or d["n"] < 2:
        return []

    def cell(k, fmt):
        return (f"{fmt.format(d['mean'][k])} ({fmt.format(d['min'][k])}-"
                f"{fmt.format(d['max'][k])})")
    rows = [("relevance to the held-out messages", "relevance", "{:.3f}"),
            (f"degenerate greedy replies, of {d['messages']}", "degenerate", "{:.1f}"),
            (f"facts answered, of {d['facts']}", "facts", "{:.1f}"),
            (f"relevance to the {d['situations']} situations that call for a persona",
             "situation_relevance", "{:.3f}")]
    eps = f"{d['eps']:g}".replace("e-0", "e-")
    out = [f"Greedy draws (train/draws.py): {d['n']} draws of the base model and `auto`, the first "
           "as run above, each further one with every mixing weight nudged by "
           f"{eps} (the base model gets {eps} of one expert), because greedy "
           "replies turn on the last bits of the arithmetic; the goals read the mean (min-max "
           "in brackets):", "", "| figure | base | auto |", "|---|---|---|"]
    out += [f"| {name} | {cell(k + '_base', f)} | {cell(k + '_auto', f)} |" for name, k, f in rows]
    out.append(f"| called-for trait moved above the base, of {d['situations']} | - | "
               f"{cell('moved', '{:.1f}')}, {d['mean']['moved_share']:.0%} |")
    return out + [""]
