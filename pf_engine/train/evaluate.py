"""pf-eval: does each persona work, and does it leave the model intact?  (held-out split only)

Conditions, for each of the ten poles p, beside the base model:

    expert:p    persona {p: 1.0}: the trained LoRA expert alone
    prompt:p    the base model with a system prompt describing p (the cheap way a user tries first)

Measures (metrics.py has the maths):
  1. statements: log-likelihood shift of held-out self-descriptions (trait x pole matrix);
  2. replies: greedy replies to held-out messages, scored by bag-of-words trait classifiers fitted
     on the train split (their held-out accuracy is reported beside them);
  3. router: top-2 agreement of ``persona="auto"`` with held-out situations' target mixes, and
     whether its gates vary;
  4. guards: perplexity of held-out neutral replies under each expert / under the base model, and
     distinct-2 plus a degenerate-reply count of the generated replies;
  5. usefulness (usefulness.py): relevance by an independent sentence encoder, substance on open
     requests, facts answered, degenerate replies greedy and sampled, auto against the base
     model where a situation calls for a trait, the router's strength where none is called for;
  6. retention (retention.py, base, auto and the experts): reasoning by lm-evaluation-harness
     through pf-serve, refusals of harmful requests and of benign look-alikes, and the
     social-emotional tone of replies to held-out situations under VADER.
"""
from __future__ import annotations

import time

import torch

from pf_engine.errors import PFError
from pf_engine.train.data import TRAITS, load_corpus
from pf_engine.train.metrics import (TraitClassifier, degenerate, distinct_n, expression_summary,
                      gate_spread,
                      perplexity, top2_agreement, trait_scores)
from pf_engine.train.sequences import (EVAL_SELF_PROMPT, ChatEncoder, Sequence, pad_batch,
                                       system_prompt)


def conditions(corpus, default_system: str | None = None) -> list[dict]:
    """[{"name", "family", "pole", "persona", "system"}]: base, then prompt:p and expert:p.

    A prompted pole keeps the model's default system prompt and adds the pole's description, so
    it differs from the base model by the description alone."""
    out = [{"name": "base", "family": "base", "pole": None, "persona": None, "system": None}]
    for family in ("prompt", "expert"):
        for p in corpus.poles:
            out.append({"name": f"{family}:{p}", "family": family, "pole": p,
                        "persona": {p: 1.0} if family == "expert" else None,
                        "system": system_prompt(corpus.descriptions[p], default_system)
                        if family == "prompt"
                        else None})
    return out


@torch.inference_mode()
def score(eng, seqs: list[Sequence], personas: list, batch: int = 16) -> list[tuple[float, int]]:
    """(sum of reply-token log-likelihoods, reply tokens) per sequence, personas one per row.

    Sequences are batched by length (less padding) and returned in the order given."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].ids))
    out = [None] * len(seqs)
    for i in range(0, len(order), batch):
        idx = order[i:i + batch]
        ids, targets, mask = pad_batch([seqs[j] for j in idx])
        logits = eng.logits(ids, persona=[personas[j] for j in idx])
        lp = torch.gather(torch.log_softmax(logits, -1), 2, targets.unsqueeze(-1))[..., 0]
        for j, s, n in zip(idx, (lp * mask).sum(1).tolist(), mask.sum(1).tolist()):
            out[j] = (s, n)
    return out


def _statement_shifts(eng, enc, corpus, conds, limit, bar):
    held = corpus.heldout.statements
    stmts = [(p, s) for p in corpus.poles for s in held[p][:limit or None]]
    seqs, personas, owner = [], [], []
    for c in conds:
        for p, s in stmts:
            seqs.append(enc.sequence(EVAL_SELF_PROMPT, s, system=c["system"]))
            personas.append(c["persona"])
            owner.append((c["name"], p))
    scores = score(eng, seqs, personas)
    bar.update(1)
    ll = {c["name"]: {p: [] for p in corpus.poles} for c in conds}
    for (name, p), (s, n) in zip(owner, scores):
        ll[name][p].append(s / n)
    S = {name: trait_scores(v) for name, v in ll.items()}
    return {name: {t: S[name][t] - S["base"][t] for t in TRAITS} for name in S}, S


def _replies(eng, enc, corpus, conds, limit, max_new_tokens, bar, sampling=None):
    """{condition: {message id: reply}} for the held-out messages."""
    from pf_engine.train.usefulness import generate
    mids = sorted(corpus.heldout.messages)[:limit or None]
    out = generate(eng, enc, conds, [corpus.heldout.messages[m] for m in mids], max_new_tokens,
                   sampling)
    bar.update(1)
    return {name: dict(zip(mids, v)) for name, v in out.items()}


def _classifiers(corpus):
    """Per trait: a classifier fitted on the train split, and its held-out accuracy."""
    def texts(split, pole):
        return list(split.replies[pole].values()) + split.statements[pole]

    tr, ho = corpus.train, corpus.heldout
    clf, acc = {}, {}
    for t in TRAITS:
        clf[t] = TraitClassifier(texts(tr, t + "+"), texts(tr, t + "-"))
        acc[t] = clf[t].accuracy(texts(ho, t + "+"), texts(ho, t + "-"))
    return clf, acc


def _router(eng, corpus, limit):
    """Top-2 agreement on the situations that call for a persona (those that call for none are
    usefulness.strength_measures' business)."""
    from pf_engine.train.data import NONE
    sits, seen = [], {}
    for s in corpus.heldout.situations:          # at most `limit` per category
        if s["target"].get(NONE):
            continue
        seen[s["category"]] = seen.get(s["category"], 0) + 1
        if not limit or seen[s["category"]] <= limit:
            sits.append(s)
    outs = eng.generate([s["text"] for s in sits], max_new_tokens=1, persona="auto", chat=True)
    gates = [o.gates["weights"] for o in outs]
    targets = [s["target"] for s in sits]
    by_cat: dict[str, list[int]] = {}
    for i, s in enumerate(sits):
        by_cat.setdefault(s["category"], []).append(i)
    return {"top2_agreement": top2_agreement(gates, targets), **gate_spread(gates, corpus.poles),
            "per_category": {c: top2_agreement([gates[i] for i in ix], [targets[i] for i in ix])
                             for c, ix in sorted(by_cat.items())},
            "situations": len(sits),
            "examples": [{"text": sits[i]["text"], "target": targets[i], "gates": gates[i]}
                         for i in [ix[0] for ix in by_cat.values()]]}


def _perplexity(eng, enc, corpus, limit, bar):
    pairs = corpus.heldout.neutral[:limit or None]
    seqs = [enc.sequence(q, a) for q, a in pairs]
    out = {}
    for name, persona in [("base", None)] + [(f"expert:{p}", {p: 1.0}) for p in corpus.poles]:
        s = score(eng, seqs, [persona] * len(seqs))
        out[name] = perplexity([a for a, _ in s], [n for _, n in s])
    bar.update(1)
    return {"ppl": out, "ratio": {k: v / out["base"] for k, v in out.items()},
            "max_ratio": max(v / out["base"] for k, v in out.items() if k != "base")}


def _retention(eng, enc, corpus, conds, limit: int, max_new_tokens: int, bar,
               draws: int = 1) -> dict:
    """retention.py's three measures for base, auto (if routed) and the experts (last: the
    reasoning measure rebuilds the engine's scheduler); the safety one over ``draws`` greedy
    draws (draws.safety_draws)."""
    from pf_engine.train import retention
    from pf_engine.train.draws import safety_draws
    keep = [c for c in conds if c["family"] != "prompt"]
    out = {"safety": retention.safety(eng, enc, keep, limit=limit, max_new_tokens=max_new_tokens)}
    bar.update(1)
    if eng.bank is not None and draws > 1:
        out["safety"]["draws"] = safety_draws(eng, enc, keep, out["safety"], draws,
                                              max_new_tokens, bar)
    auto = [c for c in keep if c["family"] == "auto"]
    out["social"] = retention.social(eng, enc, corpus, auto, limit=limit,
                                     max_new_tokens=max_new_tokens) if auto else None
    bar.update(1)
    out["reasoning"] = retention.reasoning(eng, keep, limit=limit)
    bar.update(1)
    return out


def evaluate(adapters="bigfive", data_dir=None, model=None, limit: int = 0,
             max_new_tokens: int = 48, progress: bool = True, quantize: str | None = None,
             retention: bool = True, draws: int = 1) -> dict:
    """Run every measure on the held-out split; returns the results (pf-eval writes them).
    quantize: the weights the engine serves (Engine's; None: the model's default, for the
    bundled model its 4-bit file; "f32": its float weights).  draws: greedy draws of the base
    model and auto for the usefulness goals (draws.py; 1: the run as given only)."""
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise PFError(f"draws {draws!r}: expected a whole number >= 1")
    from tqdm.auto import tqdm

    from pf_engine.engine import Engine
    from pf_engine.train import draws as drawing
    from pf_engine.train import usefulness
    from pf_engine.train.data import default_data_dir
    from pf_engine.train.encoder import SentenceEncoder
    t0 = time.perf_counter()
    corpus = load_corpus(data_dir or default_data_dir())
    encoder = SentenceEncoder()
    eng = Engine.from_pretrained(model=model, adapters=adapters, device="cpu", dtype="fp32",
                                 quantize=quantize, progress=progress)
    enc = ChatEncoder(eng.tokenizer.hf)
    conds = conditions(corpus, enc.default_system())
    routed = eng.bank.router is not None
    every = conds + ([usefulness.AUTO] if routed else [])
    sampling, sampling_source = eng.generation_defaults(chat=True)
    sampling = dict(sampling, seed=0)
    clf, clf_acc = _classifiers(corpus)
    with tqdm(total=7 + 3 * retention + (draws - 1) * (routed + retention), desc="pf-eval",
              disable=not progress) as bar:
        shift, S = _statement_shifts(eng, enc, corpus, conds, limit, bar)
        texts = _replies(eng, enc, corpus, every, limit, max_new_tokens, bar)
        sampled = _replies(eng, enc, corpus, every, limit, max_new_tokens, bar, sampling)
        ppl = _perplexity(eng, enc, corpus, limit, bar)
        router = _router(eng, corpus, limit) if routed else None
        bar.update(1)
        mids = sorted(texts["base"])
        useful = usefulness.measure(
            eng, enc, corpus, every, {k: [v[m] for m in mids] for k, v in texts.items()},
            {k: [v[m] for m in mids] for k, v in sampled.items()}, mids, encoder, clf, limit,
            max_new_tokens, bar) if routed else None
        if useful is not None:
            useful["draws"] = drawing.measure(eng, enc, corpus, useful, mids, encoder, clf,
                                              draws, limit, max_new_tokens, bar)
        kept = _retention(eng, enc, corpus, every, limit, max_new_tokens, bar, draws) \
            if retention else None
    reply_p = {name: {t: sum(clf[t].prob(list(v.values()))) / len(v) for t in TRAITS}
               for name, v in texts.items()}
    reply_shift = {name: {t: reply_p[name][t] - reply_p["base"][t] for t in TRAITS}
                   for name in reply_p}
    families = {}
    for fam in ("expert", "prompt"):
        rows = {c["pole"]: c["name"] for c in conds if c["family"] == fam}
        families[fam] = {
            "statements": {"shift": {p: shift[n] for p, n in rows.items()},
                           **expression_summary({p: shift[n] for p, n in rows.items()})},
            "replies": {"shift": {p: reply_shift[n] for p, n in rows.items()},
                        **expression_summary({p: reply_shift[n] for p, n in rows.items()})},
        }
    quality = {name: {"distinct2": distinct_n(list(v.values())),
                      "degenerate": sum(degenerate(t) for t in v.values()), "n": len(v)}
               for name, v in texts.items()}
    return {
        "bank": adapters if isinstance(adapters, str) else "in-memory",
        "recipe": eng.bank.recipe, "data_sha256": corpus.digest, "limit": limit,
        "max_new_tokens": max_new_tokens, "traits": TRAITS, "poles": corpus.poles,
        "trait_scores": S, "families": families, "classifier_heldout_accuracy": clf_acc,
        "reply_probability": reply_p, "quality": quality, "perplexity": ppl, "router": router,
        "replies": texts, "replies_sampled": sampled, "messages": corpus.heldout.messages,
        "usefulness": useful, "retention": kept, "sampling": {"greedy": {"temperature": 0},
                                           "default": sampling, "default_source": sampling_source},
        "backend": eng.backend.name, "seconds": round(time.perf_counter() - t0, 1),
        "quantize": quantize, "weights": eng.weight_formats,
    }

