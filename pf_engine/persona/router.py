"""Gates: how much of each persona expert a token gets.

Whatever produces them, a forward pass consumes one gate matrix G [T, K] in float32 (token t,
expert k): row t multiplies expert k's LoRA delta at every adapted linear layer,

    y[t] = W x[t] + sum_k G[t, k] * s_k * B_k (A_k x[t])          (s_k: the expert's LoRA scaling)

Three sources, one per ``persona`` argument of the engine:

* explicit weights, ``{"extraversion+": 0.8, "agreeableness+": 0.4}``: the same row for every
  token of the request (``explicit_gates``; ``parse_persona`` reads the CLI's string form);
* ``"auto"``: the ``SequenceRouter`` (PersonaFuse's persona encoder) reads the prompt once and
  gives one row per request;
* per token: the ``TokenRouter`` (MoLE / X-LoRA style) gives one row per token and layer.

Routers keep their parameters in float32 and are deterministic: top-k ties go to the expert with
the lower index.  They compute in float64 (ROUTE_DTYPE) and round the gates to float32 once: a
float32 GEMM's blocking and a reduction's lane order differ between CPUs and BLAS builds, so
float32 gates differed in their last bits from one machine to another (1e-6 on bigfive's), and
on the 4-bit default those bits reached the replies through the 8-bit activation rounding;
float64 puts the difference far below float32's resolution.  Both save into and load from the
adapter bank file (see bank.py):

    router.seq.w1 [H, d]  router.seq.b1 [H]  router.seq.w2 [K(+1), H]  router.seq.b2 [K(+1)]
                          (+1: the "none" output of a router whose config says "none": true)
    router.tok.{l}.w [K, d]  router.tok.{l}.b [K]       for every layer l
"""
from __future__ import annotations

import json
import math

import torch
import torch.nn.functional as F

from pf_engine.errors import LoadError, PFError, RequestError


ROUTE_DTYPE = torch.float64     # what routers compute in; their gates are float32


# Explicit persona weights -------------------------------------------------------------------------
def explicit_gates(persona: dict[str, float], expert_names) -> torch.Tensor:
    """One gate row [K] (float32) from user weights ``{expert name: weight}``.

    Rule: the weights are used as given, NOT normalised, and experts not named get 0.  So
    ``{"x": 1.0}`` reproduces the PEFT adapter ``x`` exactly, ``{"x": 2.0}`` doubles its delta,
    and ``{"a": 0.5, "b": 0.5}`` equals PEFT's ``add_weighted_adapter(["a", "b"], [0.5, 0.5],
    combination_type="cat")`` (which folds w_k * s_k into each A_k and gives the result scaling
    1; with rsLoRA on the first adapter PEFT's cat scaling is sqrt(R) instead, a PEFT quirk we do
    not copy).  Weights must be finite numbers >= 0, not all zero (to run the
    base model, pass no persona at all); names must be the bank's expert names.
    """
    names = list(expert_names)
    if not isinstance(persona, dict):
        raise RequestError(f"persona must be a dict {{expert name: weight}}, got {persona!r}")
    if not persona:
        raise RequestError("persona is empty: name at least one expert, e.g. "
                           f"{{{names[0]!r}: 1.0}}" if names else "persona is empty")
    index = {n: i for i, n in enumerate(names)}
    g = torch.zeros(len(names), dtype=torch.float32)
    for name, w in persona.items():
        if name not in index:
            raise RequestError(f"unknown expert {name!r}; this bank's experts are: "
                               f"{', '.join(names)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise RequestError(f"weight of expert {name!r} must be a number, got {w!r}")
        w = float(w)
        if not math.isfinite(w) or w < 0:
            raise RequestError(f"weight of expert {name!r} must be finite and >= 0, got {w!r}")
        g[index[name]] = w
    if not bool((g > 0).any()):
        raise RequestError("persona weights are all zero: give at least one expert a weight > 0 "
                           "(or pass no persona to run the base model)")
    return g


def parse_persona(s: str) -> dict[str, float] | str:
    """Read the CLI form of a persona.

    ``"auto"`` -> ``"auto"`` (the bank's sequence router decides);
    ``"extraversion+=0.8,agreeableness+=0.4"`` -> ``{"extraversion+": 0.8, "agreeableness+": 0.4}``;
    a JSON object ``'{"extraversion+": 0.8}'`` is read too.  Names are checked against a bank
    later, by ``explicit_gates``; here only the syntax and the numbers.
    """
    if not isinstance(s, str):
        raise RequestError(f"persona must be a string, got {s!r}")
    text = s.strip()
    if text.lower() == "auto":
        return "auto"
    if text.startswith("{"):
        try:
            d = json.loads(text)
        except ValueError as e:
            raise RequestError(f"bad persona {s!r}: not valid JSON ({e})") from None
        if not isinstance(d, dict):
            raise RequestError(f"bad persona {s!r}: expected a JSON object")
        out = {}
        for k, v in d.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise RequestError(f"bad persona {s!r}: weight of {k!r} is not a number")
            out[k] = float(v)
        return out
    if not text:
        raise RequestError("bad persona '': expected 'auto' or NAME=WEIGHT[,NAME=WEIGHT...], "
                           "e.g. 'extraversion+=0.8,agreeableness+=0.4'")
    out: dict[str, float] = {}
    for part in text.split(","):
        name, eq, value = part.strip().partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name or not value:
            raise RequestError(f"bad persona {s!r}: {part.strip()!r} is not NAME=WEIGHT; expected "
                               "'auto' or e.g. 'extraversion+=0.8,agreeableness+=0.4'")
        try:
            w = float(value)
        except ValueError:
            raise RequestError(f"bad persona {s!r}: weight {value!r} of {name!r} is not a "
                               "number") from None
        if name in out:
            raise RequestError(f"bad persona {s!r}: expert {name!r} is given twice")
        out[name] = w
    return out


# Shared helpers -----------------------------------------------------------------------------------
def top_k_renormalise(p: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest entries of each row of ``p`` [..., K] (>= 0), zero the rest, rows sum 1.

    Ties go to the lower expert index (a stable descending sort), so the result is deterministic.
    A row that is all zeros stays all zeros.
    ``k`` None or >= K keeps every expert (still renormalised).
    """
    K = p.shape[-1]
    if k is not None and k < K:
        order = torch.sort(p, dim=-1, descending=True, stable=True).indices
        keep = torch.zeros_like(p, dtype=torch.bool).scatter_(-1, order[..., :k], True)
        p = torch.where(keep, p, torch.zeros((), dtype=p.dtype, device=p.device))
    total = p.sum(dim=-1, keepdim=True)
    # a row whose kept entries all underflowed to 0 (a none output at ~1) stays 0, not 0/0
    return p / torch.where(total > 0, total, torch.ones_like(total))


def _check_top_k(top_k, num_experts: int, what: str):
    if top_k is None or top_k == 0:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise PFError(f"{what} top_k must be an integer in 1..{num_experts} (or 0/None for all), "
                      f"got {top_k!r}")
    return top_k


def _get(tensors: dict, name: str, shape: tuple, where: str) -> torch.Tensor:
    t = tensors.get(name)
    if t is None:
        raise LoadError(f"{where}: router tensor {name} is missing")
    if tuple(t.shape) != tuple(shape):
        raise LoadError(f"{where}: router tensor {name} has shape {list(t.shape)}, "
                        f"expected {list(shape)}")
    return t.to(torch.float32)


LOGIT_EPS = 1e-6          # logit(q) is taken of q clamped to [eps, 1 - eps]


def _check_strength(strength, none: bool) -> dict | None:
    """The calibration {"scale", "slope", "centre"} as floats (None: none), or one clear error."""
    if strength is None:
        return None
    if not none:
        raise PFError("sequence router strength calibration needs a none output (none: true)")
    keys = ("scale", "slope", "centre")
    if not isinstance(strength, dict) or set(strength) != set(keys):
        raise PFError(f"sequence router strength must be a dict with keys {list(keys)}, "
                      f"got {strength!r}")
    try:
        out = {k: float(strength[k]) for k in keys}
    except (TypeError, ValueError):
        raise PFError(f"sequence router strength values must be numbers, got {strength!r}") \
            from None
    if not all(math.isfinite(v) for v in out.values()) or not 0 < out["scale"] <= 1 \
            or out["slope"] <= 0:
        raise PFError(f"sequence router strength needs 0 < scale <= 1, slope > 0 and a finite "
                      f"centre, got {strength!r}")
    return out


def total_weight(p_none: torch.Tensor, strength: dict | None) -> torch.Tensor:
    """p_none [...] -> the strength [...]: 1 - p_none, or with a calibration {scale S, slope a,
    centre c} S * sigmoid(a * (logit(1 - p_none) - c))."""
    q = 1 - p_none
    if strength is None:
        return q
    x = torch.logit(q, eps=LOGIT_EPS)
    return strength["scale"] * torch.sigmoid(strength["slope"] * (x - strength["centre"]))


# Sequence router ("auto") -------------------------------------------------------------------------
class SequenceRouter:
    """PersonaFuse's persona encoder: one gate row per request from its prompt.

        pooled = sum_t mask[b, t] h[b, t] / sum_t mask[b, t]            [B, d]
        logits = W2 silu(W1 pooled + b1) + b2                            [B, K] or [B, K+1]
        p      = softmax(logits / temperature)
        gates  = renormalise(top_k(p[:, :K]))                            [B, K], rows sum to 1
        gates *= strength                                with none=True: rows sum to the strength
        strength = 1 - p[:, K]                                           without a calibration
        strength = S * sigmoid(a * (logit(1 - p[:, K]) - c))             with strength {S, a, c}

    With ``none`` the router has one more output, "no persona is called for" (facts, code,
    arithmetic, neutral how-to): its probability takes that share off the whole mix, so such a
    prompt gets a small total persona weight and the reply stays close to the base model's.
    The optional calibration ``strength = {"scale": S, "slope": a, "centre": c}`` (fitted by
    pf-train on held-out folds, train/router.py) maps the router's persona probability to the
    total weight: a prompt the router is fairly sure calls for a persona gets about S, one it is
    sure calls for none gets about 0.
    ``h`` is the output of decoder layer ``layer`` for the prompt (``layer`` 0: the token
    embeddings, L: the last layer's output before the final norm).  A row whose mask selects no
    token pools to zeros (gates from the biases alone).
    """

    def __init__(self, w1, b1, w2, b2, layer: int = 0, temperature: float = 1.0,
                 top_k: int | None = None, none: bool = False, strength: dict | None = None):
        self.w1, self.b1, self.w2, self.b2 = (t.to(torch.float32) for t in (w1, b1, w2, b2))
        H, d = self.w1.shape
        self.none = bool(none)
        K = self.w2.shape[0] - self.none
        if K < 1:
            raise PFError(f"sequence router w2 {list(self.w2.shape)}: expected at least "
                          f"{1 + self.none} outputs (experts{' and none' if self.none else ''})")
        KO = K + self.none
        if tuple(self.b1.shape) != (H,) or tuple(self.w2.shape) != (KO, H) or \
                tuple(self.b2.shape) != (KO,):
            raise PFError(f"sequence router shapes do not agree: w1 {list(self.w1.shape)}, "
                          f"b1 {list(self.b1.shape)}, w2 {list(self.w2.shape)}, "
                          f"b2 {list(self.b2.shape)}")
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 0:
            raise PFError(f"sequence router layer must be an integer >= 0, got {layer!r}")
        temperature = float(temperature)
        if not math.isfinite(temperature) or temperature <= 0:
            raise PFError(f"sequence router temperature must be finite and > 0, got {temperature}")
        self.layer, self.temperature = layer, temperature
        self.top_k = _check_top_k(top_k, K, "sequence router")
        self.strength = _check_strength(strength, self.none)

    num_experts = property(lambda self: self.w2.shape[0] - self.none)
    hidden_size = property(lambda self: self.w1.shape[1])
    router_hidden = property(lambda self: self.w1.shape[0])
    device = property(lambda self: self.w1.device)

    def __call__(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [B, T, d] (any float dtype), mask [B, T] bool (None: all) -> gates [B, K] fp32
        (computed in ROUTE_DTYPE)."""
        h = hidden.to(device=self.device, dtype=ROUTE_DTYPE)              # (B, T, d)
        if mask is None:
            pooled = h.mean(dim=1)
        else:
            m = mask.to(device=self.device, dtype=ROUTE_DTYPE).unsqueeze(-1)     # (B, T, 1)
            pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)   # (B, d)
        return self.gates(self.probabilities(pooled)).to(torch.float32)

    def probabilities(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled [B, d] -> softmax over the outputs [B, K] (or [B, K+1], none last), in pooled's
        dtype (ROUTE_DTYPE when serving; float32 in training, where the parameters get grads)."""
        w1, b1, w2, b2 = (t.to(pooled.dtype) for t in (self.w1, self.b1, self.w2, self.b2))
        z = F.silu(F.linear(pooled, w1, b1))                              # (B, H)
        logits = F.linear(z, w2, b2) / self.temperature                   # (B, K(+1))
        return torch.softmax(logits, dim=-1)

    def gates(self, p: torch.Tensor) -> torch.Tensor:
        """Output probabilities [B, K(+1)] -> gates [B, K]: top-k of the experts, renormalised,
        times the strength (total_weight; 1 without a none output)."""
        K = self.num_experts
        g = top_k_renormalise(p[:, :K], self.top_k)
        return g * total_weight(p[:, K:], self.strength) if self.none else g

    def to(self, device=None) -> "SequenceRouter":
        """Move to ``device`` (in place; parameters stay float32); returns self."""
        self.w1, self.b1, self.w2, self.b2 = (t.to(device) for t in
                                              (self.w1, self.b1, self.w2, self.b2))
        return self

    # file form
    def config(self) -> dict:
        out = {"layer": self.layer, "temperature": self.temperature, "top_k": self.top_k,
               "hidden": self.router_hidden, "none": self.none}
        if self.strength is not None:
            out["strength"] = dict(self.strength)
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"router.seq.w1": self.w1, "router.seq.b1": self.b1,
                "router.seq.w2": self.w2, "router.seq.b2": self.b2}

    @classmethod
    def from_tensors(cls, tensors: dict, config: dict, num_experts: int, hidden_size: int,
                     num_layers: int, where: str = "bank") -> "SequenceRouter":
        try:
            H, layer = int(config["hidden"]), int(config["layer"])
            temperature, top_k = float(config["temperature"]), config.get("top_k")
            none = config.get("none", False)
            if not isinstance(none, bool):
                raise ValueError(f"none must be true or false, got {none!r}")
            strength = config.get("strength")
        except (KeyError, TypeError, ValueError) as e:
            raise LoadError(f"{where}: bad sequence router config {config!r} ({e})") from None
        if not 0 <= layer <= num_layers:
            raise LoadError(f"{where}: sequence router reads layer {layer}, but the model has "
                            f"layers 0..{num_layers}")
        K, d = num_experts + none, hidden_size
        w = [_get(tensors, f"router.seq.{n}", s, where) for n, s in
             (("w1", (H, d)), ("b1", (H,)), ("w2", (K, H)), ("b2", (K,)))]
        try:
            return cls(*w, layer=layer, temperature=temperature, top_k=top_k, none=none,
                       strength=strength)
        except PFError as e:
            raise LoadError(f"{where}: {e}") from None

    @classmethod
    def random(cls, num_experts: int, hidden_size: int, router_hidden: int = 64, layer: int = 0,
               temperature: float = 1.0, top_k: int | None = 2, seed: int = 0,
               generator: torch.Generator | None = None, none: bool = False,
               strength: dict | None = None) -> "SequenceRouter":
        """Seeded random router (tests, demos): the gates it gives mean nothing."""
        g = generator or torch.Generator().manual_seed(seed)
        H, d, K = router_hidden, hidden_size, num_experts
        w1 = torch.randn(H, d, generator=g) / math.sqrt(d)
        w2 = torch.randn(K + none, H, generator=g) / math.sqrt(H)
        b2 = 0.1 * torch.randn(K + none, generator=g)
        return cls(w1, torch.zeros(H), w2, b2, layer=layer, temperature=temperature,
                   top_k=None if top_k is None else min(top_k, K), none=none, strength=strength)


# Token router (per layer) -------------------------------------------------------------------------
class TokenRouter:
    """MoLE / X-LoRA style: one gate row per token and layer.

        gates = renormalise(top_k(softmax(h W_l^T + b_l)))     h [N, d] -> [N, K], rows sum to 1

    ``h`` is the hidden state entering decoder layer ``layer``; its gates weight every adapted
    projection of that layer.
    """

    def __init__(self, weights, biases, top_k: int | None = None):
        self.w = [w.to(torch.float32) for w in weights]        # L x [K, d]
        self.b = [b.to(torch.float32) for b in biases]         # L x [K]
        if not self.w or len(self.w) != len(self.b):
            raise PFError(f"token router needs one weight and one bias per layer, got "
                          f"{len(self.w)} weights and {len(self.b)} biases")
        K, d = self.w[0].shape
        for l, (w, b) in enumerate(zip(self.w, self.b)):
            if tuple(w.shape) != (K, d) or tuple(b.shape) != (K,):
                raise PFError(f"token router layer {l}: w {list(w.shape)}, b {list(b.shape)}; "
                              f"expected [{K}, {d}] and [{K}]")
        self.top_k = _check_top_k(top_k, K, "token router")

    num_experts = property(lambda self: self.w[0].shape[0])
    hidden_size = property(lambda self: self.w[0].shape[1])
    num_layers = property(lambda self: len(self.w))
    device = property(lambda self: self.w[0].device)

    def __call__(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h [N, d] (any float dtype) entering decoder layer ``layer`` -> gates [N, K] fp32
        (computed in ROUTE_DTYPE)."""
        x = h.to(device=self.device, dtype=ROUTE_DTYPE)
        w, b = self.w[layer].to(ROUTE_DTYPE), self.b[layer].to(ROUTE_DTYPE)
        # each row's K dot products summed on their own (not one GEMM over the N rows, whose
        # blocking depends on N): a token's gates do not depend on the batch or the chunk
        logits = (x.unsqueeze(1) * w).sum(-1) + b                                    # (N, K)
        return top_k_renormalise(torch.softmax(logits, dim=-1), self.top_k).to(torch.float32)

    def to(self, device=None) -> "TokenRouter":
        """Move to ``device`` (in place; parameters stay float32); returns self."""
        self.w = [w.to(device) for w in self.w]
        self.b = [b.to(device) for b in self.b]
        return self

    # file form
    def config(self) -> dict:
        return {"top_k": self.top_k, "num_layers": self.num_layers}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for l, (w, b) in enumerate(zip(self.w, self.b)):
            out[f"router.tok.{l}.w"], out[f"router.tok.{l}.b"] = w, b
        return out

    @classmethod
    def from_tensors(cls, tensors: dict, config: dict, num_experts: int, hidden_size: int,
                     num_layers: int, where: str = "bank") -> "TokenRouter":
        try:
            L, top_k = int(config["num_layers"]), config.get("top_k")
        except (KeyError, TypeError, ValueError) as e:
            raise LoadError(f"{where}: bad token router config {config!r} ({e})") from None
        if L != num_layers:
            raise LoadError(f"{where}: token router has {L} layers, the model {num_layers}")
        K, d = num_experts, hidden_size
        ws = [_get(tensors, f"router.tok.{l}.w", (K, d), where) for l in range(L)]
        bs = [_get(tensors, f"router.tok.{l}.b", (K,), where) for l in range(L)]
        try:
            return cls(ws, bs, top_k=top_k)
        except PFError as e:
            raise LoadError(f"{where}: {e}") from None

    @classmethod
    def random(cls, num_experts: int, hidden_size: int, num_layers: int, top_k: int | None = 2,
               seed: int = 0, generator: torch.Generator | None = None) -> "TokenRouter":
        """Seeded random router (tests, demos): the gates it gives mean nothing."""
        g = generator or torch.Generator().manual_seed(seed)
        K, d = num_experts, hidden_size
        ws = [torch.randn(K, d, generator=g) / math.sqrt(d) for _ in range(num_layers)]
        bs = [0.1 * torch.randn(K, generator=g) for _ in range(num_layers)]
        return cls(ws, bs, top_k=None if top_k is None else min(top_k, K))
