"""pf-eval's measures as pure functions of numbers and texts
(tested on fixtures with known answers).

Trait expression.  For a condition c (the base model, a prompted pole, an expert) and trait T,
the trait score is how much more c likes T+ texts than T- texts:

    S_T(c) = mean_{s in T+} ll_c(s) - mean_{s in T-} ll_c(s)
    shift[c][T] = S_T(c) - S_T(base)

where ll_c(s) is the per-token mean log-likelihood of held-out self-description s.  For the
condition of pole p (trait T(p), sign sgn(p) = +1 / -1) the shift row should point along
sgn(p) on T(p) and stay near 0 on the other traits:

    moves_own(p)     = sgn(p) * shift[p][T(p)] > 0
    separation(T)    = shift[T+][T] - shift[T-][T]                   > 0: the poles separate
    specificity      = mean_p |shift[p][T(p)]| / mean_p mean_{T' != T(p)} |shift[p][T']|
"""
from __future__ import annotations

import math
import re
from collections import Counter

import torch

from pf_engine.train.data import TRAITS, trait_of


def sign(pole: str) -> int:
    return 1 if pole.endswith("+") else -1


def trait_scores(ll: dict[str, list[float]]) -> dict[str, float]:
    """S_T for each trait from {pole: [ll of that pole's statements]}."""
    mean = {p: sum(v) / len(v) for p, v in ll.items()}
    return {t: mean[t + "+"] - mean[t + "-"] for t in TRAITS}


def expression_summary(shift: dict[str, dict[str, float]]) -> dict:
    """Summary of a shift matrix {pole: {trait: shift}} (one condition per pole)."""
    poles = list(shift)
    own = {p: shift[p][trait_of(p)] for p in poles}
    off = {p: [abs(shift[p][t]) for t in TRAITS if t != trait_of(p)] for p in poles}
    separation = {t: shift[t + "+"][t] - shift[t + "-"][t] for t in TRAITS
                  if t + "+" in shift and t + "-" in shift}
    on_mean = sum(abs(v) for v in own.values()) / len(poles)
    off_mean = sum(sum(v) / len(v) for v in off.values()) / len(poles)
    return {
        "moves_own": {p: sign(p) * own[p] > 0 for p in poles},
        "moves_own_count": sum(sign(p) * own[p] > 0 for p in poles),
        "separation": separation,
        "separated_count": sum(v > 0 for v in separation.values()),
        "separation_sum": sum(separation.values()),
        "on_target_mean": on_mean,
        "off_target_mean": off_mean,
        "specificity": on_mean / off_mean if off_mean > 0 else math.inf,
        "specificity_per_pole": {p: abs(own[p]) / (sum(off[p]) / len(off[p]))
                                 if sum(off[p]) > 0 else math.inf for p in poles},
    }


def top2_agreement(gates: list[dict[str, float]], targets: list[dict[str, float]]) -> float:
    """Fraction of rows whose two largest gates include a pole the target mix uses (> 0)."""
    hits = 0
    for g, t in zip(gates, targets):
        top = sorted(g, key=lambda p: (-g[p], p))[:2]
        hits += any(t.get(p, 0) > 0 for p in top)
    return hits / len(gates)


def gate_spread(gates: list[dict[str, float]], poles: list[str]) -> dict:
    """How much the router's gates vary: distinct top-2 sets, mean per-pole std."""
    rows = torch.tensor([[g.get(p, 0.0) for p in poles] for g in gates])
    top2 = {tuple(sorted(sorted(g, key=lambda p: (-g[p], p))[:2])) for g in gates}
    return {"distinct_top2": len(top2), "mean_std": float(rows.std(0).mean()) if len(gates) > 1
            else 0.0}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+|[!?]", text.lower())


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique word n-grams over all n-grams of ``texts`` (0 when there are none)."""
    grams = [tuple(w[i:i + n]) for t in texts for w in [words(t)] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def degenerate(text: str) -> bool:
    """Empty-ish (< 3 words) or looping (a word 3-gram repeated 3+ times) reply."""
    w = words(text)
    if len(w) < 3:
        return True
    grams = Counter(tuple(w[i:i + 3]) for i in range(len(w) - 2))
    return bool(grams) and max(grams.values()) >= 3


def perplexity(sum_ll: list[float], n_tokens: list[int]) -> float:
    """Token-weighted perplexity exp(-sum ll / sum n) over sequences."""
    return math.exp(-sum(sum_ll) / sum(n_tokens))


class TraitClassifier:
    """Bag-of-words logistic regression P(T+ | text) for one trait, trained on the train split.

    Features: binary unigrams and bigrams of ``words`` seen at least twice in training; L2
    regularised, fitted full-batch with L-BFGS (deterministic).
    """

    def __init__(self, pos: list[str], neg: list[str], l2: float = 1e-2):
        grams = Counter(g for t in pos + neg for g in set(self._grams(t)))
        self.vocab = {g: i for i, g in enumerate(sorted(g for g, c in grams.items() if c >= 2))}
        x = self._features(pos + neg)
        y = torch.tensor([1.0] * len(pos) + [0.0] * len(neg))
        self.w = torch.zeros(x.shape[1], requires_grad=True)
        self.b = torch.zeros((), requires_grad=True)
        opt = torch.optim.LBFGS([self.w, self.b], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ self.w + self.b, y) \
                + l2 * self.w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        self.w, self.b = self.w.detach(), self.b.detach()

    @staticmethod
    def _grams(text: str) -> list:
        w = words(text)
        return w + [a + " " + b for a, b in zip(w, w[1:])]

    def _features(self, texts: list[str]) -> torch.Tensor:
        x = torch.zeros(len(texts), len(self.vocab))
        for i, t in enumerate(texts):
            for g in self._grams(t):
                j = self.vocab.get(g)
                if j is not None:
                    x[i, j] = 1.0
        return x

    def prob(self, texts: list[str]) -> list[float]:
        return torch.sigmoid(self._features(texts) @ self.w + self.b).tolist()

    def accuracy(self, pos: list[str], neg: list[str]) -> float:
        p = self.prob(pos + neg)
        right = sum(q > 0.5 for q in p[:len(pos)]) + sum(q < 0.5 for q in p[len(pos):])
        return right / len(p)


# Usefulness ---------------------------------------------------------------------------------------
_ITEM = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|[a-z][.)])\s+\S", re.I | re.M)


def substance(text: str) -> dict:
    """How much a reply to an open request offers: its words (``words``, punctuation excluded)
    and its items, the larger of list lines (``- x``, ``1. x``, ``a) x``) and sentences."""
    w = [t for t in words(text) if t not in ("!", "?")]
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if len(words(s)) >= 3]
    return {"words": len(w), "items": max(len(_ITEM.findall(text)), len(sentences))}


def fact_correct(reply: str, answers: list[str]) -> bool:
    """Does the reply contain one of the accepted answers?  Case-insensitive; an answer that
    starts or ends with a letter or digit must stand alone there (so "8" is not found in
    "1989" and "mercury" is found in "Mercury.")."""
    low = reply.lower()
    for a in answers:
        pre = r"(?<![a-z0-9])" if a[:1].isalnum() else ""
        post = r"(?![a-z0-9])" if a[-1:].isalnum() else ""
        if re.search(pre + re.escape(a) + post, low):
            return True
    return False


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
