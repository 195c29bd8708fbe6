"""pf-eval's usefulness measures: do persona replies still answer what was asked?  (held-out)

Conditions: the base model, ``auto`` (the router's mix at its strength), each expert at 1.0,
each pole by system prompt.  For each, on replies to the held-out messages (greedy):

    relevance   mean cos(e(message), e(reply)), e: all-MiniLM-L6-v2 (encoder.py, not ours)
    substance   on open requests (messages marked open): mean words and items (metrics.substance)
    degenerate  replies that loop or say nothing, greedy and at the chat default sampling

and on held-out fact questions (greedy, FACT_TOKENS): the share answered correctly
(metrics.fact_correct).  For ``auto`` against the base model on held-out situations:

    trait moved   situations that call for a persona: the share where the classifier's
                  probability of the target's leading pole is higher in auto's reply than in
                  the base model's, with the mean relevance of both beside it; the same share
                  for that pole's expert at 1.0 and for its system prompt (where pf-eval runs
                  those conditions), the reach of the experts and of prompting on that measure
    strength      no-persona situations, fact questions and neutral prompts: the share routed
                  to a total persona weight <= NONE_MAX (router.py)
"""
from __future__ import annotations

from pf_engine.train.data import NONE, lead_pole, trait_of
from pf_engine.train.metrics import degenerate, fact_correct, mean, substance
from pf_engine.train.router import NONE_MAX

FACT_TOKENS = 32
AUTO = {"name": "auto", "family": "auto", "pole": None, "persona": "auto", "system": None}
SIDE_BY_SIDE = 6


def generate(eng, enc, conds: list[dict], texts: list[str], max_new_tokens: int,
             sampling: dict | None = None, B: int = 48) -> dict[str, list[str]]:
    """{condition name: [reply to texts[i]]}: every condition on every text (run_jobs)."""
    jobs = [(c, t) for c in conds for t in texts]
    flat = run_jobs(eng, enc, jobs, max_new_tokens, sampling, B)
    return {c["name"]: flat[k * len(texts):(k + 1) * len(texts)] for k, c in enumerate(conds)}


def run_jobs(eng, enc, jobs: list[tuple[dict, str]], max_new_tokens: int,
             sampling: dict | None = None, B: int = 48) -> list[str]:
    """[reply to each (condition, text) job], batched by prompt length (mixed personas and
    system prompts share a batch).  sampling: SamplingParams fields (default greedy)."""
    prompts = [enc.prompt(t, system=c["system"]) for c, t in jobs]
    out = [""] * len(jobs)
    order = sorted(range(len(jobs)), key=lambda j: len(prompts[j]))
    for s in range(0, len(order), B):
        idx = order[s:s + B]
        res = eng.generate([prompts[j] for j in idx], max_new_tokens=max_new_tokens,
                           persona=[jobs[j][0]["persona"] for j in idx], **(sampling or {}))
        for j, o in zip(idx, res):
            out[j] = o.text.strip()
    return out


def lead_conditions(conds: list[dict], sits: list[dict]) -> dict[str, list[dict]]:
    """{family: [the condition of each situation's leading pole]} for the families ("expert",
    "prompt") whose condition exists for every situation's leading pole."""
    named = {c["name"]: c for c in conds}
    out = {}
    for fam in ("expert", "prompt"):
        names = [f"{fam}:{lead_pole(s['target'])}" for s in sits]
        if all(n in named for n in names):
            out[fam] = [named[n] for n in names]
    return out


def reply_measures(corpus, mids: list[str], greedy: dict, sampled: dict, encoder) -> dict:
    """Per condition: relevance, substance on open requests, degenerate counts."""
    msgs = [corpus.heldout.messages[m] for m in mids]
    open_ix = [i for i, m in enumerate(mids) if m in corpus.heldout.open]
    out = {}
    for name, replies in greedy.items():
        rel = encoder.relevance(msgs, replies)
        subs = [substance(replies[i]) for i in open_ix]
        out[name] = {"relevance": mean(rel), "relevance_each": [round(r, 4) for r in rel],
                     "words": mean(s["words"] for s in subs),
                     "items": mean(s["items"] for s in subs), "open_requests": len(open_ix),
                     "degenerate_greedy": sum(degenerate(t) for t in replies),
                     "degenerate_sampled": sum(degenerate(t) for t in sampled.get(name, [])),
                     "n": len(replies)}
    base = out["base"]
    for v in out.values():
        v["words_vs_base"] = v["words"] / base["words"] if base["words"] else float("nan")
    return out


def fact_measures(facts: list[dict], replies: dict) -> dict:
    """Per condition: fact questions whose reply holds an accepted answer."""
    return {name: {"correct": sum(fact_correct(r, f["answers"]) for r, f in zip(rs, facts)),
                   "n": len(facts)} for name, rs in replies.items()}


def situation_measures(sits: list[dict], replies: dict, encoder, clf) -> dict:
    """auto against base on situations that call for a persona (see the module docstring).
    replies: {"auto", "base", and optionally "expert"/"prompt" (the leading pole's condition):
    [reply to sits[i]]}; the optional ones are scored against base under "lead"."""
    texts = [s["text"] for s in sits]
    names = ["auto", "base"] + [k for k in ("expert", "prompt") if k in replies]
    rel = {k: encoder.relevance(texts, replies[k]) for k in names}
    moved, rows = dict.fromkeys(names, 0), []
    for i, s in enumerate(sits):
        lead = lead_pole(s["target"])
        p = dict(zip(names, clf[trait_of(lead)].prob([replies[k][i] for k in names])))
        if lead.endswith("-"):
            p = {k: 1 - v for k, v in p.items()}
        row = {"id": s["id"], "category": s["category"], "pole": lead}
        for k in names:
            moved[k] += k != "base" and p[k] > p["base"]
            row[f"p_{k}"] = round(p[k], 4)
        rows.append(row)
    n = max(1, len(sits))
    out = {"situations": len(sits), "moved": moved["auto"], "moved_share": moved["auto"] / n,
           "relevance_auto": mean(rel["auto"]), "relevance_base": mean(rel["base"]), "each": rows}
    lead = {k: {"moved": moved[k], "moved_share": moved[k] / n, "relevance": mean(rel[k])}
            for k in names[2:]}
    return {**out, "lead": lead} if lead else out


def strength_measures(eng, corpus, limit: int) -> dict:
    """Total persona weight under auto for prompts that call for none, per kind."""
    h = corpus.heldout
    kinds = {"no-persona situations": [s["text"] for s in h.situations if s["target"].get(NONE)],
             "fact questions": [f["question"] for f in h.facts],
             "neutral prompts": [q for q, _ in h.neutral]}
    out, every = {}, []
    for kind, texts in kinds.items():
        texts = texts[:limit or None]
        outs = eng.generate(texts, max_new_tokens=1, persona="auto", chat=True)
        st = [o.gates["strength"] for o in outs]
        every += st
        out[kind] = {"n": len(st), "low": sum(v <= NONE_MAX for v in st), "mean": mean(st)}
    out["all"] = {"n": len(every), "low": sum(v <= NONE_MAX for v in every),
                  "low_share": sum(v <= NONE_MAX for v in every) / max(1, len(every)),
                  "mean": mean(every), "threshold": NONE_MAX}
    return out


def side_by_side(persona_sits: list[dict], none_sits: list[dict], replies: dict, gates: dict,
                 open_msg: tuple[str, str, str] | None) -> list[dict]:
    """Six held-out prompts with the base and auto replies: the first situation of each of the
    first four categories that call for a persona, the first that calls for none, the first
    open request (open_msg: its text, base reply, auto reply).  replies: {"base"/"auto":
    {situation id: reply}}; gates: {prompt text: auto's gates}."""
    rows, seen = [], set()
    picks = []
    for s in persona_sits:
        if s["category"] not in seen and len(picks) < SIDE_BY_SIDE - 2:
            seen.add(s["category"])
            picks.append(s)
    picks += none_sits[:1]
    for s in picks:
        rows.append({"prompt": s["text"], "kind": s["category"], "base": replies["base"][s["id"]],
                     "auto": replies["auto"][s["id"]], "gates": gates.get(s["text"])})
    if open_msg is not None:
        text, base, auto = open_msg
        rows.append({"prompt": text, "kind": "open request", "base": base, "auto": auto,
                     "gates": gates.get(text)})
    return rows


def situation_replies(eng, enc, conds, persona_sits, none_sits, max_new_tokens):
    """Greedy replies to the held-out situations in one batched run: base and auto to all of
    them, each lead_conditions family to those that call for a persona.  Returns ({"base",
    "auto", family: [reply to persona_sits[i]]} for situation_measures, {"base", "auto",
    "lead:<family>": {situation id: reply}} for the JSON)."""
    pair = [c for c in conds if c["name"] in ("base", "auto")]
    sits = persona_sits + none_sits
    lead = lead_conditions(conds, persona_sits)
    jobs = [(c, s["text"]) for c in pair for s in sits]
    jobs += [(c, s["text"]) for fam in lead for c, s in zip(lead[fam], persona_sits)]
    flat = run_jobs(eng, enc, jobs, max_new_tokens)
    n, total, ids = len(persona_sits), len(sits), [s["id"] for s in sits]
    by_id = {c["name"]: dict(zip(ids, flat[k * total:(k + 1) * total]))
             for k, c in enumerate(pair)}
    reps = {name: list(v.values())[:n] for name, v in by_id.items()}
    for k, fam in enumerate(lead):
        at = len(pair) * total + k * n
        reps[fam] = flat[at:at + n]
        by_id[f"lead:{fam}"] = dict(zip(ids[:n], reps[fam]))
    return reps, by_id


def measure(eng, enc, corpus, conds: list[dict], greedy: dict, sampled: dict, mids, encoder,
            clf, limit: int, max_new_tokens: int, progress=None) -> dict:
    """Every usefulness figure for pf-eval's JSON (greedy/sampled: the message replies)."""
    h = corpus.heldout
    facts = h.facts[:limit or None]
    fact_replies = generate(eng, enc, conds, [f["question"] for f in facts], FACT_TOKENS)
    if progress is not None:
        progress.update(1)
    persona_sits = [s for s in h.situations if not s["target"].get(NONE)]
    none_sits = [s for s in h.situations if s["target"].get(NONE)]
    if limit:
        persona_sits, none_sits = persona_sits[:limit * 4], none_sits[:limit]
    sits = persona_sits + none_sits
    sit_reps, sit_replies = situation_replies(eng, enc, conds, persona_sits, none_sits,
                                              max_new_tokens)
    open_ids = [m for m in mids if m in h.open]
    routed = [s["text"] for s in sits] + [h.messages[m] for m in open_ids[:1]]
    gates = {t: o.gates for t, o in zip(routed, eng.generate(
        routed, max_new_tokens=1, persona="auto", chat=True))}
    if progress is not None:
        progress.update(1)
    open_msg = None
    if open_ids:
        i = mids.index(open_ids[0])
        open_msg = (h.messages[open_ids[0]], greedy["base"][i], greedy["auto"][i])
    return {
        "replies": reply_measures(corpus, mids, greedy, sampled, encoder),
        "facts": fact_measures(facts, fact_replies),
        "fact_replies": {k: v for k, v in fact_replies.items() if k in ("base", "auto")},
        "situations": situation_measures(persona_sits, sit_reps, encoder, clf),
        "situation_replies": sit_replies,
        "strength": strength_measures(eng, corpus, limit),
        "side_by_side": side_by_side(persona_sits, none_sits, sit_replies, gates, open_msg),
    }
