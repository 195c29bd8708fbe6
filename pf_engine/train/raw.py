"""Raw-text items for the KL term: the experts keep the base model's next-token distribution on
text that no chat template frames, as lm-evaluation-harness and ``/v1/completions`` send it.

The experts learn on chat turns, where every reply ends with the end-of-turn token; at weight 1
they carried that into plain completions (on the shipped bank, p(end of text) right after
"Question: What is 5 plus 33?\\nAnswer:" is 0.13-0.19 against the base model's 0.09), and greedy
arithmetic answers came back empty (pf-eval's retention: up to 11 of 60 per expert).

For every train-split neutral prompt and fact question (file order) the prompt is written in one
of ``FORMATS`` (by index) and the base model, as served, continues it greedily for at most
``RAW_TOKENS`` tokens (ending early at its end token, which is then kept: the position that
predicts it is the one that drifted).  The KL term then holds

    mean over continuation tokens y_t of KL(pi_base(. | x, y_<t) || pi(. | x, y_<t))

on these beside the chat replies (``Recipe.raw`` of them per step).  Questions that pf-eval's
retention tasks ask (``data/evals/``) are left out, so the term never sees an evaluated item.

Arithmetic (``arith_prompts``, ``Recipe.arith`` per step, drawn apart from the rest): the neutral
and fact questions did not hold the experts' plain-text arithmetic (at 8a025ba conscientiousness-
still answered 6 of pf-eval's 60 items with nothing and scored -11.7 points), so the term
also holds ``ARITH_QUESTIONS`` arithmetic questions of the same kinds as pf-eval's (bare sums,
differences and products, one-step word problems), generated here from a seed and words of
their own, none equal to an evaluated question.  The term only keeps the base model's own
continuations, right or wrong: it retains the base's arithmetic, it does not teach any.
"""
from __future__ import annotations

import json
import os

from pf_engine.train.sequences import Sequence

FORMATS = ("Question: {q}\nAnswer:", "Q: {q}\nA:", "{q}\n")
RAW_TOKENS = 12
ARITH_QUESTIONS = 48
ARITH_TAG = "arith"               # Sequence.tag prefix of the arithmetic items (kl_items)
_OPS = (("plus", "+"), ("minus", "-"), ("times", "*"))
_NAMES = ("Kai", "Nora", "Ivan", "Ella", "Hugo", "Sara", "Theo", "Ines")
_THINGS = ("oranges", "buttons", "cards", "coins", "eggs", "balloons", "toys", "beads")


def is_plain(seq: Sequence) -> bool:
    """Whether ``seq`` is a raw-text or arithmetic continuation (``raw_sequences``' tags)."""
    return seq.tag.startswith(("raw", ARITH_TAG))


def evaluated_questions(evals_dir: str | None = None) -> set[str]:
    """The questions of pf-eval's reasoning tasks (lower case, stripped)."""
    from pf_engine.train.retention import default_evals_dir
    folder = evals_dir or default_evals_dir()
    out = set()
    for name in ("reasoning_mc.jsonl", "reasoning_arith.jsonl"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out.update(json.loads(line)["question"].strip().lower()
                           for line in f if line.strip())
    return out


def raw_prompts(split, limit: int = 0, exclude: set[str] | None = None) -> list[str]:
    """The split's neutral prompts then fact questions, each in ``FORMATS[i % 3]``, leaving out
    ``exclude`` (default: the evaluated questions); at most ``limit`` (0: all)."""
    exclude = evaluated_questions() if exclude is None else exclude
    questions = [q for q, _ in split.neutral] + [f["question"] for f in split.facts]
    questions = [q for q in questions if q.strip().lower() not in exclude]
    if limit:
        questions = questions[:limit]
    return [FORMATS[i % len(FORMATS)].format(q=q) for i, q in enumerate(questions)]


def _arith_question(rng, kind: int) -> str:
    """One question: kinds 0-2 bare (plus, minus, times), 3-5 word problems (gain, give, bags)."""
    if kind < 3:
        word, sym = _OPS[kind]
        a, b = (rng.randint(2, 12), rng.randint(2, 9)) if sym == "*" else \
            (rng.randint(5, 60), rng.randint(1, 40))
        a, b = (b, a) if sym == "-" and b > a else (a, b)
        return f"What is {a} {word} {b}?"
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    if kind == 3:
        return (f"{name} had {rng.randint(2, 20)} {thing} and found {rng.randint(2, 20)} more. "
                f"How many {thing} does {name} have?")
    if kind == 4:
        a = rng.randint(10, 30)
        return (f"{name} had {a} {thing} and lost {rng.randint(1, a - 1)}. "
                f"How many {thing} does {name} have left?")
    return (f"A box holds {rng.randint(2, 9)} {thing}. How many {thing} are in "
            f"{rng.randint(2, 9)} boxes?")


def arith_prompts(limit: int = 0, exclude: set[str] | None = None, seed: int = 7) -> list[str]:
    """``ARITH_QUESTIONS`` arithmetic questions (kinds in turn, distinct, none in ``exclude``,
    default: the evaluated questions), question i in ``FORMATS[(i + i // 6) % 3]`` so every
    kind meets every format; at most ``limit`` (0: all)."""
    import random
    exclude = evaluated_questions() if exclude is None else exclude
    rng, out, seen = random.Random(seed), [], set()
    n = min(limit, ARITH_QUESTIONS) if limit else ARITH_QUESTIONS
    while len(out) < n:
        q = _arith_question(rng, len(out) % 6)
        if q.lower() not in exclude and q not in seen:
            seen.add(q)
            i = len(out)
            out.append(FORMATS[(i + i // 6) % len(FORMATS)].format(q=q))
    return out


def raw_sequences(eng, prompts: list[str], progress=None, tag: str = "raw") -> list[Sequence]:
    """(prompt ids, the base model's greedy continuation ids) for ``prompts`` (``raw_prompts``
    or ``arith_prompts``), tagged ``tag:i``: ``eng`` is the base as served, with no adapters;
    its tokenizer gives the ids a server would see."""
    out = []
    for i in range(0, len(prompts), 32):
        chunk = prompts[i:i + 32]
        gens = eng.generate(chunk, max_new_tokens=RAW_TOKENS, temperature=0.0)
        out += [Sequence(eng.tokenizer.encode(p), list(g.token_ids), f"{tag}:{i + j}")
                for j, (p, g) in enumerate(zip(chunk, gens)) if g.token_ids]
        if progress is not None:
            progress.update(len(chunk))
    return out
