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
                  the base model's, with the mean relevance of both beside it
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
    """{condition name: [reply to texts[i]]}: every condition on every text, batched by length
    (mixed personas share a batch).  sampling: SamplingParams fields (default greedy)."""
    jobs = [(c, i, enc.prompt(t, system=c["system"])) for c in conds for i, t in enumerate(texts)]
    out = {c["name"]: [""] * len(texts) for c in conds}
    order = sorted(range(len(jobs)), key=lambda j: len(jobs[j][2]))
    for s in range(0, len(order), B):
        idx = order[s:s + B]
        res = eng.generate([jobs[j][2] for j in idx], max_new_tokens=max_new_tokens,
                           persona=[jobs[j][0]["persona"] for j in idx], **(sampling or {}))
        for j, o in zip(idx, res):
            out[jobs[j][0]["name"]][jobs[j][1]] = o.text.strip()
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
    """auto against base on situations that call for a persona (see the module docstring)."""
    moved, rel_a, rel_b, rows = 0, [], [], []
    texts = [s["text"] for s in sits]
    ra = encoder.relevance(texts, replies["auto"])
    rb = encoder.relevance(texts, replies["base"])
    for s, a, b, x, y in zip(sits, replies["auto"], replies["base"], ra, rb):
        lead = lead_pole(s["target"])
        t = trait_of(lead)
        pa, pb = clf[t].prob([a, b])
        if lead.endswith("-"):
            pa, pb = 1 - pa, 1 - pb
        moved += pa > pb
        rel_a.append(x)
        rel_b.append(y)
        rows.append({"id": s["id"], "category": s["category"], "pole": lead,
                     "p_auto": round(pa, 4), "p_base": round(pb, 4)})
    return {"situations": len(sits), "moved": moved, "moved_share": moved / max(1, len(sits)),
            "relevance_auto": mean(rel_a), "relevance_base": mean(rel_b), "each": rows}


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
    pair = [c for c in conds if c["name"] in ("base", "auto")]
    sits = persona_sits + none_sits
    gen = generate(eng, enc, pair, [s["text"] for s in sits], max_new_tokens)
    sit_replies = {k: dict(zip([s["id"] for s in sits], v)) for k, v in gen.items()}
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
    n = len(persona_sits)
    return {
        "replies": reply_measures(corpus, mids, greedy, sampled, encoder),
        "facts": fact_measures(facts, fact_replies),
        "fact_replies": {k: v for k, v in fact_replies.items() if k in ("base", "auto")},
        "situations": situation_measures(persona_sits,
                                         {k: v[:n] for k, v in gen.items()}, encoder, clf),
        "situation_replies": sit_replies,
        "strength": strength_measures(eng, corpus, limit),
        "side_by_side": side_by_side(persona_sits, none_sits, sit_replies, gates, open_msg),
    }
