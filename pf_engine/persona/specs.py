"""From the user's ``persona`` argument to per-request gate rows.

``persona`` is one spec for all prompts or a list with one per prompt, each of:

* None: the base model (a zero gate row: the request gets nothing from any expert);
* a dict ``{expert name: weight}`` or its string form ``"extraversion+=0.8,agreeableness+=0.4"``:
  explicit weights, used as given (router.explicit_gates);
* ``"auto"``: the bank's sequence router reads the prompt once (PersonaFuse's persona encoder);
  a bank with only a token router routes per token instead;
* ``"token"``: the bank's token router, fresh gates per token and layer.

Requests with different specs share one batch and one pass.
"""
from __future__ import annotations

import torch

from pf_engine.errors import RequestError
from pf_engine.persona.router import explicit_gates, parse_persona

BASE, EXPLICIT, SEQUENCE, TOKEN = "base", "explicit", "sequence", "token"


def parse_spec(spec):
    """One persona spec, its syntax checked without a bank: None, "auto", "token" or a dict of
    weights (a string "NAME=W,..." or JSON parsed).  Names and weights are checked against the
    bank by ``Personas``; this is what a CLI checks before it loads anything."""
    if isinstance(spec, str):
        return "token" if spec.strip() == "token" else parse_persona(spec)
    if spec is None or isinstance(spec, dict):
        return spec
    raise RequestError(f"persona {spec!r}: expected None, a dict of weights, 'auto' or 'token'")


class Personas:
    """rows [B, K] fp32 (fixed gates; sequence rows filled by ``route``), kinds [B]."""

    def __init__(self, bank, persona, n: int):
        specs = list(persona) if isinstance(persona, (list, tuple)) else [persona] * n
        if len(specs) != n:
            raise RequestError(f"persona: got {len(specs)} specs for {n} prompts; "
                               "expected one for all or one per prompt")
        if bank is None:
            if any(s is not None for s in specs):
                raise RequestError("persona given but this engine has no adapter bank "
                                   "(load one with adapters=BANK / --adapters BANK)")
            self.rows, self.kinds = None, [BASE] * n
            return
        self.bank = bank
        self.rows = torch.zeros(n, bank.num_experts, dtype=torch.float32)
        self.kinds = []
        for i, spec in enumerate(specs):
            spec = parse_spec(spec)
            if spec is None:
                self.kinds.append(BASE)
            elif spec == "auto":
                kind = SEQUENCE if bank.router is not None or bank.token_router is None else TOKEN
                bank.require_router(kind)
                self.kinds.append(kind)
            elif spec == "token":
                bank.require_router("token")
                self.kinds.append(TOKEN)
            else:
                self.rows[i] = explicit_gates(spec, bank.expert_names)
                self.kinds.append(EXPLICIT)

    @property
    def any(self) -> bool:
        return self.rows is not None and any(k != BASE for k in self.kinds)

    @property
    def token_rows(self) -> torch.Tensor:
        return torch.tensor([k == TOKEN for k in self.kinds])

    def route(self, model, tokens: torch.Tensor) -> None:
        """Fill the sequence-routed rows from their prompts tokens [B, T] (whole sequences, no
        padding): the bank's router reads the base model's hidden states."""
        idx = [i for i, k in enumerate(self.kinds) if k == SEQUENCE]
        if not idx:
            return
        r = self.bank.router
        sel = torch.tensor(idx, device=tokens.device)
        self.rows[idx] = r(model.hidden(tokens[sel], r.layer)).to(self.rows.device)

    def route_from(self, i: int, hidden: torch.Tensor) -> None:
        """Fill sequence-routed row i from the hidden states [T, d] of its whole prompt that its
        caller computed where the router reads them (runtime/routing.py: the prefill's)."""
        self.rows[i] = self.bank.router(hidden.unsqueeze(0))[0].to(self.rows.device)

    def route_each(self, model, prompts: list[list[int]]) -> None:
        """Fill the sequence-routed rows, each from its own prompt (any lengths: prompts of one
        length are routed together)."""
        by_len: dict[int, list[int]] = {}
        for i, k in enumerate(self.kinds):
            if k == SEQUENCE:
                by_len.setdefault(len(prompts[i]), []).append(i)
        r = self.bank.router if by_len else None
        for idx in by_len.values():
            tokens = torch.tensor([prompts[i] for i in idx], device=model.device)
            self.rows[idx] = r(model.hidden(tokens, r.layer)).to(self.rows.device)

    def select(self, idx: list[int]) -> "Personas":
        """The rows ``idx`` (gates as filled so far) as a Personas of their own."""
        sub = Personas.__new__(Personas)
        sub.kinds = [self.kinds[i] for i in idx]
        sub.rows = None if self.rows is None else self.rows[idx]
        if self.rows is not None:
            sub.bank = self.bank
        return sub

    def report(self, i: int, token_mean: torch.Tensor | None = None) -> dict | None:
        """The gates request i used: {"kind", "weights": {expert: weight}, "strength"}; for token
        routing ``token_mean`` [K], the mean of its gates over tokens and layers.  strength is
        the total persona weight, sum of the row: 1 for a plain router; for a sequence router
        with a "none" output its strength (1 - p_none, or its calibration: router.py), small
        where no trait is called for."""
        kind = self.kinds[i]
        if kind == BASE:
            return None
        row = self.rows[i] if kind != TOKEN else token_mean
        return {"kind": kind, "weights": {n: round(float(w), 6) for n, w in
                                          zip(self.bank.expert_names, row) if w != 0},
                "strength": round(float(row.sum()), 6)}
