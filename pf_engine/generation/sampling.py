"""Sampling: parameters, logits processors and the per-request samplers.

Order of operations on the last-position logits [B, V] (the same as transformers'):
repetition penalty -> temperature -> top-k -> top-p -> sample (or argmax when temperature == 0).
Each request owns a ``torch.Generator``: with ``seed`` given, request i of a call is seeded with
``seed + i``, so the same seed gives the same text whatever else shares the batch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
from dataclasses import dataclass, field

import torch

from pf_engine.errors import RequestError
from pf_engine.generation.structured import check_response_format


MAX_LOGPROBS = 20       # top logprobs a request may ask for per position (OpenAI's limit)
MAX_DRAFT = 16          # speculative_tokens at most (runtime/speculative.py)


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None     # report each token's logprob and this many top ones (0..20)
    response_format: dict | None = None   # OpenAI's: text, json_object, json_schema (structured.py)
    min_tokens: int = 0             # EOS is masked until this many new tokens (vLLM's field)
    ignore_eos: bool = False        # EOS does not end the request (benchmark clients send it)
    speculative_tokens: int = 0     # draft this many tokens a step by prompt lookup and verify
                                    # them in one forward (runtime/speculative.py); 0: off

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if self.response_format is not None:
            self.response_format = check_response_format(self.response_format)
        checks = [
            (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1,
             f"max_new_tokens={self.max_new_tokens!r}: expected an integer >= 1"),
            (_finite(self.temperature) and self.temperature >= 0,
             f"temperature={self.temperature!r}: expected a finite number >= 0"),
            (_finite(self.top_p) and 0 < self.top_p <= 1,
             f"top_p={self.top_p!r}: expected a number in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0,
             f"top_k={self.top_k!r}: expected an integer >= 0 (0 disables it)"),
            (_finite(self.repetition_penalty) and self.repetition_penalty > 0,
             f"repetition_penalty={self.repetition_penalty!r}: expected a number > 0 "
             "(1 disables it)"),
            (self.seed is None or isinstance(self.seed, int),
             f"seed={self.seed!r}: expected an integer or None"),
            (all(isinstance(s, str) and s for s in self.stop),
             f"stop={self.stop!r}: expected non-empty strings"),
            (self.logprobs is None or (isinstance(self.logprobs, int)
                                       and not isinstance(self.logprobs, bool)
                                       and 0 <= self.logprobs <= MAX_LOGPROBS),
             f"logprobs={self.logprobs!r}: expected None or an integer in 0..{MAX_LOGPROBS}"),
            (isinstance(self.min_tokens, int) and not isinstance(self.min_tokens, bool)
             and 0 <= self.min_tokens <= self.max_new_tokens,
             f"min_tokens={self.min_tokens!r}: expected an integer in 0..max_new_tokens "
             f"({self.max_new_tokens})"),
            (isinstance(self.ignore_eos, bool),
             f"ignore_eos={self.ignore_eos!r}: expected true or false"),
            (isinstance(self.speculative_tokens, int)
             and not isinstance(self.speculative_tokens, bool)
             and 0 <= self.speculative_tokens <= MAX_DRAFT,
             f"speculative_tokens={self.speculative_tokens!r}: expected an integer in "
             f"0..{MAX_DRAFT} (0: off)"),
        ]
        for ok, msg in checks:
            if not ok:
                raise RequestError(msg)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def merged(cls, sampling: "SamplingParams | None", kw: dict) -> "SamplingParams":
        """``sampling`` (None: the defaults) with the fields given as keywords replaced: what
        ``Engine.generate(prompts, sampling, **kw)`` and its siblings accept.  An unknown
        keyword is a RequestError naming it."""
        if sampling is not None and not isinstance(sampling, cls):
            raise RequestError(f"sampling={sampling!r}: expected a SamplingParams or None")
        names = [f.name for f in dataclasses.fields(cls)]
        bad = [k for k in kw if k not in names]
        if bad:
            raise RequestError(f"unknown argument {bad[0]!r}: expected persona, chat, truncate or "
                               f"a sampling field ({', '.join(names)})")
        if sampling is None:
            return cls(**kw)
        return dataclasses.replace(sampling, **kw) if kw else sampling

    def budget(self, prompt_len: int, context: int) -> int:
        """New tokens a request of ``prompt_len`` prompt tokens may generate: max_new_tokens, or
        fewer where the model's ``context`` ends first (the one place this is decided)."""
        return min(self.max_new_tokens, context - prompt_len)

    def for_request(self, i: int) -> "SamplingParams":
        """The parameters of request i of a call: seeded with seed + i when a seed is given."""
        return self if self.seed is None else dataclasses.replace(self, seed=self.seed + i)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of each row of logits [n, V] -> [n] (the first of equal maxima, NaN first, as
    ``argmax``): torch.max's indices, which torch 2.13 computes 2.6x faster than argmax on the
    CPU (a 49152 vocabulary at one thread: 25 against 66 us, once per decode step)."""
    return torch.max(logits, -1).indices


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor,
                             penalty: float) -> torch.Tensor:
    """logits [B, V]; seen [B, V] bool: tokens already in the sequence get l / p (l > 0) or
    l * p."""
    pen = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, pen, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    drop = (probs.cumsum(-1) - probs) >= p        # mass before this token already reaches p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))


class Sampler:
    """Chooses the next token of each active request from its logits."""

    def __init__(self, params: SamplingParams, batch: int, vocab: int, device):
        self.params = params
        self.seen = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
        self.generators = None
        if not params.greedy:
            base = params.seed if params.seed is not None else secrets.randbits(62)
            self.generators = [torch.Generator(device=device).manual_seed(base + i)
                               for i in range(batch)]

    def observe(self, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        """Record tokens [n, T] of requests ``rows`` for the repetition penalty."""
        if self.params.repetition_penalty != 1.0:
            self.seen[rows.unsqueeze(1).expand_as(tokens), tokens] = True

    def __call__(self, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """logits [n, V] of requests ``rows`` (indices into the original batch) -> tokens [n]."""
        p = self.params
        if p.repetition_penalty != 1.0:
            logits = apply_repetition_penalty(logits, self.seen[rows], p.repetition_penalty)
        if p.greedy:
            return greedy(logits)
        probs = self.probs(logits)
        return torch.cat([torch.multinomial(probs[i], 1, generator=self.generators[r])
                          for i, r in enumerate(rows)])

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution a sampled token is drawn from, for logits [n, V] (after any
        repetition penalty): temperature, then top-k, then top-p, softmax."""
        p = self.params
        return top_p_filter(top_k_filter(logits / p.temperature, p.top_k), p.top_p).softmax(-1)


# Defaults a CLI or the server uses for the fields a user leaves out ------------------------------
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")
# For chat with a model whose generation_config.json says nothing about sampling (the bundled
# SmolLM2-135M-Instruct, converted from GGUF, has token ids only): its model card's temperature
# and top-p, and a mild repetition penalty, which keeps a 135M model from looping at greedy.
CHAT_DEFAULTS = {"temperature": 0.2, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.1}
GREEDY = {"temperature": 0.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def generation_defaults(folder: str, chat: bool) -> tuple[dict, str]:
    """({temperature, top_p, top_k, repetition_penalty}, where they come from) for a model folder.

    As transformers does, the model's own ``generation_config.json`` decides where it speaks of
    sampling: ``do_sample`` true gives its temperature / top_p / top_k (transformers' defaults
    1.0 / 1.0 / 50 for fields it leaves out) and repetition_penalty; ``do_sample`` false (or only
    a repetition_penalty) gives greedy with that penalty.  A config silent on sampling gives
    ``CHAT_DEFAULTS`` for chat and greedy for plain completion.
    """
    cfg = {}
    path = os.path.join(folder, "generation_config.json")
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            cfg = {}
    if not isinstance(cfg, dict) or not any(k in cfg for k in ("do_sample",) + SAMPLING_FIELDS):
        return (dict(CHAT_DEFAULTS), "the chat defaults, as the model's generation config sets "
                "no sampling") if chat else \
            (dict(GREEDY), "greedy, as the model's generation config sets no sampling")
    out = dict(GREEDY, repetition_penalty=float(cfg.get("repetition_penalty", 1.0)))
    if cfg.get("do_sample") is True:
        out.update(temperature=float(cfg.get("temperature", 1.0)),
                   top_p=float(cfg.get("top_p", 1.0)), top_k=int(cfg.get("top_k", 50)))
    return out, "the model's generation_config.json"
