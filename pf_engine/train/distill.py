"""The base model's own replies to held-in prompts: what the KL term keeps each expert close to.

For every train-split prompt (messages, situations, neutral prompts, fact questions; with the
safety term on, also the benign look-alikes of harmful requests in safety.jsonl) the base
model answers once, greedy with the chat repetition penalty (``GENERATE``); a reply is kept when

    not degenerate(reply)                       (metrics.degenerate: no loop, >= 3 words)
    relevance(prompt, reply) >= MIN_RELEVANCE   (the independent sentence encoder, encoder.py)
    a fact question's reply contains an accepted answer

so the experts are held to the base model where it is helpful and fluent, not where it loops.
``report`` counts what was generated and why replies were dropped (the README quotes it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pf_engine.train.metrics import degenerate, fact_correct

GENERATE = {"max_new_tokens": 48, "temperature": 0.0, "repetition_penalty": 1.1}
MIN_RELEVANCE = 0.3


@dataclass
class BaseReplies:
    pairs: list[tuple[str, str]] = field(default_factory=list)     # (prompt, reply) kept
    report: dict = field(default_factory=dict)


def held_in_prompts(split, benign: bool = False, held=frozenset()
                    ) -> list[tuple[str, str, list | None]]:
    """(kind, prompt, accepted answers or None) for every train-split prompt, in file order;
    benign: safety.jsonl's benign look-alikes too (kind "benign"), but those in ``held`` (kept
    out to score checkpoints on: data.split_safety)."""
    out = [("message", split.messages[m], None) for m in sorted(split.messages)]
    out += [("situation", s["text"], None) for s in split.situations]
    out += [("neutral", q, None) for q, _ in split.neutral]
    out += [("fact", f["question"], f["answers"]) for f in split.facts]
    if benign:
        out += [("benign", r["prompt"], None) for r in split.safety
                if r["kind"] == "benign" and r["prompt"] not in held]
    return out


def base_replies(eng, split, encoder, limit: int = 0, progress=None,
                 benign: bool = False, held=frozenset()) -> BaseReplies:
    """Generate, score and filter the base model's replies to ``split``'s prompts (benign: the
    benign look-alikes too, but those in ``held``)."""
    prompts = held_in_prompts(split, benign, held)
    if limit:
        prompts = prompts[::max(1, len(prompts) // limit)][:limit]       # spread over the kinds
    texts = []
    B = 32
    for i in range(0, len(prompts), B):
        chunk = prompts[i:i + B]
        outs = eng.generate([p for _, p, _ in chunk], chat=True, **GENERATE)
        texts += [o.text.strip() for o in outs]
        if progress is not None:
            progress.update(len(chunk))
    rel = encoder.relevance([p for _, p, _ in prompts], texts)
    kept, dropped = [], {"degenerate": 0, "irrelevant": 0, "wrong_fact": 0}
    per_kind: dict[str, list[int]] = {}
    for (kind, prompt, answers), text, r in zip(prompts, texts, rel):
        n = per_kind.setdefault(kind, [0, 0])
        n[0] += 1
        if degenerate(text):
            dropped["degenerate"] += 1
        elif r < MIN_RELEVANCE:
            dropped["irrelevant"] += 1
        elif answers is not None and not fact_correct(text, answers):
            dropped["wrong_fact"] += 1
        else:
            kept.append((prompt, text))
            n[1] += 1
    report = {"generated": len(prompts), "kept": len(kept), "dropped": dropped,
              "per_kind": {k: {"generated": g, "kept": c} for k, (g, c) in per_kind.items()},
              "settings": dict(GENERATE, min_relevance=MIN_RELEVANCE)}
    return BaseReplies(kept, report)
