"""What generation returns: per-request outputs and per-call timings."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's log-probability under the model (log-softmax of its logits, before
    temperature, penalties and top-k/top-p: generation/scoring.py) and the ``top`` most likely
    tokens at
    that position as (token id, logprob), most likely first."""
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationOutput:
    text: str
    token_ids: list[int]
    finish_reason: str                  # "stop" (EOS or a stop string), "length" or "cancelled"
    usage: dict = field(default_factory=dict)   # prompt_tokens, completion_tokens
    gates: dict | None = None           # persona weights used (with an adapter bank)
    logprobs: list[Logprob] | None = None   # one per token id, when SamplingParams.logprobs is set
    cached_tokens: int = 0              # prompt tokens reused from the prefix cache
    shared_cached_tokens: int = 0       # of them, from its persona-independent layers (the
                                        # persona's own layers computed: runtime/prefix_cache.py)


@dataclass
class Stats:
    """Timings of the last generate/stream call (seconds, tokens)."""
    prefill_tokens: int = 0
    prefill_s: float = 0.0
    decode_tokens: int = 0
    decode_s: float = 0.0
    draft_tokens: int = 0          # speculative decoding: tokens drafted, and of them accepted
    accepted_tokens: int = 0

    @property
    def prefill_tps(self) -> float:
        return self.prefill_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0
