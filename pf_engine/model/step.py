"""What kind of forward a model call is, decided once by whoever plans it and passed down to the
blocks, the products and the backend (none of them infers it from a shape).

    Step(decode=True, mixed=True, token=False)   # the scheduler's decode step with personas
    WHOLE                                         # whole sequences or a prefill chunk, base model

decode: every row is one new token after its cached columns (x [B, 1, d]); the attention is one
batched matmul over the cache with an additive mask, the products may take a few-rows GEMM form,
and the cpu backend may run the block in its fused C++ step.  A prefill chunk of one token is
not a decode step.  mixed: some row runs persona experts; token: some row is routed per token
(the forward's Mix carries the gates themselves; these say what the step is, for the runner's
and the static decode's choices).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    decode: bool = False
    mixed: bool = False
    token: bool = False


WHOLE = Step()
