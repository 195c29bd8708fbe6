"""Speculative decoding by prompt lookup: a request drafts its next tokens from its own text and
one forward of the target, with the request's persona gates, verifies them all.

Drafting (no second model: it suits a memory-bound CPU decode, where a forward over k + 1 tokens
reads the weights once, as a decode step does).  For the sequence s = prompt + generated so far,
the last n tokens (n = NGRAM_MAX .. NGRAM_MIN, the longest that occurred before) are looked up at
their latest earlier occurrence, and the up to k tokens that followed it there are the draft
(vLLM's and llama.cpp's "prompt lookup" / n-gram drafting):

    s = [.. a b c x y z .. a b c]    n = 3: "a b c" occurred before, followed by "x y z"
    draft = [x, y, z][:k]

Verifying (runner.StepRunner.verify): one forward in which every token is a row of its own, as
in a decode step of that many rows: the request's last token and d_1 .. d_k at its next k + 1
columns, rows sharing its slot (kv_cache.RowsView.spread; every row's k, v is written before any
row attends, row i sees its slot's columns up to its own).  t_i = argmax logits_i is then what
decoding would give after last, d_1 .. d_i, and the draft is accepted up to its first miss:

    m = max { j : d_i = t_(i-1) for all i <= j }       tokens emitted: t_0 .. t_m (m + 1)

so the tokens are the non-speculative greedy tokens exactly wherever a token's logits do not
depend on the rows beside it: the cpu backend's byte-stored weights (the default 4-bit model)
and ``deterministic=True`` (README: batch invariance), its fused decode step taking up to
MAX_ROWS rows (a step's drafts are cut to fit).  The KV columns of last, d_1 .. d_m are the ones
decoding would have written; the columns of the rejected drafts lie past the request's new length
and are overwritten by its next step.  (A forward of k + 1 tokens as one prefill chunk would read
the weights once too, but its norms and residuals are torch's, not the decode step's: its logits
differ in the last bits, which flips near-tied greedy tokens.)

Sampling requests (temperature > 0) verify by the standard acceptance rule instead (``sampled``):
their tokens are distributed as without drafts.

Per request: ``SamplingParams.speculative_tokens`` = k (0: off).  It applies to requests without
a repetition penalty, grammar, logprobs or a pending min_tokens (the others decode one token per
step in the same forward); on CUDA's static decode and under tensor parallelism it
is off.  The scheduler counts
drafted and accepted tokens (Stats.draft_tokens, accepted_tokens; pf-serve's /metrics).
"""
from __future__ import annotations

from pf_engine.generation.sampling import MAX_DRAFT  # noqa: F401  (speculative_tokens at most)

MAX_ROWS = 16            # tokens of one verify step (csrc/cpu's MAX_ROWS: kept equal by a test)

NGRAM_MAX, NGRAM_MIN = 3, 1


def propose(seq: list[int], k: int) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of seq's last n tokens,
    for the longest n in NGRAM_MAX..NGRAM_MIN that occurred before (empty: none did)."""
    L = len(seq)
    for n in range(min(NGRAM_MAX, L - 1), NGRAM_MIN - 1, -1):
        tail = seq[L - n:]
        first = tail[0]
        for i in range(L - n - 1, -1, -1):         # latest first; i + n <= L - 1
            if seq[i] == first and seq[i:i + n] == tail:
                return seq[i + n:i + n + k]
    return []


class Drafting:
    """A request's drafting state: how many tokens to draft next (k, from its speculative_tokens
    down to 1), and how many steps to skip after drafts that missed outright.

    After a verify of L drafted tokens with m accepted (transformers' assisted generation
    heuristic, and a back-off): m = L: k += 2 (at most speculative_tokens); m < L: k -= 1 (at
    least 1); m = 0 for the second time in a row or more: no draft for the next 4^(misses - 1)
    steps (misses: drafts missed in a row; at most MAX_WAIT), so text the lookup cannot predict
    costs a verify now and then, not every step, while one miss (a copy that changed a word)
    costs no wait."""

    MAX_WAIT = 64

    def __init__(self, k_max: int):
        self.k_max, self.k, self.misses, self.wait = k_max, k_max, 0, 0

    def done(self, drafted: int, m: int) -> None:
        self.k = min(self.k_max, self.k + 2) if m == drafted else max(1, self.k - 1)
        self.misses = self.misses + 1 if m == 0 else 0
        self.wait = min(self.MAX_WAIT, 4 ** (self.misses - 1)) if self.misses > 1 else 0


def draft_for(r) -> list[int]:
    """The draft of a decoding request ``r`` this step (empty: decode one token)."""
    k = r.params.speculative_tokens
    if (k <= 0 or r.params.repetition_penalty != 1.0 or r.grammar is not None
            or r.params.logprobs is not None
            or len(r.tokens) < r.params.min_tokens or not r.tokens):
        return []
    if r.drafting is None:
        r.drafting = Drafting(k)
    d = r.drafting
    if d.wait > 0:
        d.wait -= 1
        return []
    k = min(d.k, r.budget - len(r.tokens) - 1)  # never past the budget (nor the slot's columns)
    if k <= 0:
        return []
    return propose(r.ids + r.tokens, k)


def drafts_for(reqs: list) -> list[list[int]]:
    """The drafts of a decode step's requests (slot order), their tokens together at most
    MAX_ROWS rows (each request's last token one of them; the cpu backend's fused decode step
    takes that many rows, backends/cpu/decode.py): the first requests' drafts first."""
    room = MAX_ROWS - len(reqs)
    out = []
    for r in reqs:
        d = draft_for(r)[:max(0, room)] if room > 0 else []
        room -= len(d)
        out.append(d)
    return out


def sampled(r, draft: list[int], logits) -> tuple[int, int]:
    """(m, the token after the m accepted) for a sampling request: the standard acceptance rule
    with the draft a point mass (q(d) = 1).  At position i, p = the request's distribution
    (Sampler.probs); d_i is accepted with probability p(d_i), else the token is drawn from p
    without d_i, renormalised (max(0, p - q) normalised), and the draft ends; with all accepted,
    the next token is drawn from p at the last position.  The tokens are then distributed as the
    non-speculative sampler's (not the same draws: the request's generator is used differently).
    logits: [len(draft) + 1, V], position i after last, d_1 .. d_i."""
    import torch
    probs = r.sampler.probs(logits.float())
    gen = r.sampler.generators[0]
    for i, d in enumerate(draft):
        if torch.rand((), generator=gen, device=probs.device) < probs[i, d]:
            continue
        rest = probs[i].clone()
        rest[d] = 0.0
        return i, int(torch.multinomial(rest / rest.sum(), 1, generator=gen))
    return len(draft), int(torch.multinomial(probs[-1], 1, generator=gen))


def accepted(draft: list[int], targets: list[int]) -> int:
    """m: how many of ``draft`` equal the target's tokens (targets[i] follows draft[:i])."""
    m = 0
    while m < len(draft) and draft[m] == targets[m]:
        m += 1
    return m
