"""Other servers' per-request mixture fields, read as a persona's weights, so that clients written
for llama.cpp's server or LoRAX work against pf-serve unchanged.

    llama.cpp server  "lora": [{"id": 0, "scale": 0.5}, {"id": 1, "scale": 1.1}]
                      id: the expert's index in the bank, as GET /lora-adapters lists them
                      (``adapters``); an expert not listed gets 0, as in llama.cpp
    LoRAX             "merged_adapters": {"ids": ["openness+", "agreeableness+"],
                                          "weights": [0.7, 0.3], "merge_strategy": "linear"}
                      ids: expert names; merge_strategy "linear" (the default) only

Both become the weights {expert: w} of an explicit persona (persona/router.py's rule: used as
given, not normalised; every weight >= 0); all zero, or an empty list, is the base model.

What differs from the peers: llama.cpp adds each adapter's delta times its scale, the sum pf-serve
computes (exactly); LoRAX's linear merge sums the A matrices and the B matrices separately
(sum_i w_i B_i . sum_j w_j A_j, cross terms included), pf-serve the adapters' products
(sum_i w_i B_i A_i): the same only for one adapter.  LoRAX's "ties", "dare_linear" and
"dare_ties" (sparsifying merges), ``density`` below 1 and llama.cpp's negative scales are refused
with a 400 naming the field.
"""
from __future__ import annotations

import math

FIELDS = ("lora", "merged_adapters")


class AliasError(ValueError):
    """A malformed alias field: ``field`` and a one-line message."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def persona(body: dict, experts: list[str]) -> tuple[str, dict | None] | None:
    """(the field used, its persona weights or None for the base model), or None when the body
    has neither field.  ``experts``: the bank's expert names in order (none: no bank)."""
    given = [f for f in FIELDS if body.get(f) is not None]
    if not given:
        return None
    if len(given) > 1:
        raise AliasError(given[1], f"give one of {' or '.join(FIELDS)}, not both")
    field = given[0]
    if not experts:
        raise AliasError(field, "this server has no adapter bank (start it with --adapters BANK)")
    weights = _lora(body[field], experts) if field == "lora" else _merged(body[field], experts)
    return field, ({k: w for k, w in weights.items() if w != 0.0} or None)


def adapters(model_ids: list[str]) -> list[dict]:
    """GET /lora-adapters: llama.cpp's listing, one entry per expert in bank order (``path``: the
    expert's name; ``scale``: 0, a request without ``lora`` runs the base model).  model_ids:
    the catalog's (protocol.Catalog), the bare id first, then ``id:<expert>`` in bank order."""
    base = model_ids[0]
    names = [i.split(":", 1)[1] for i in model_ids if i.startswith(base + ":")]
    names = [n for n in names if n not in ("auto", "token")]
    return [{"id": i, "path": n, "scale": 0.0} for i, n in enumerate(names)]


def _weight(field: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise AliasError(field, f"expected a finite number, got {value!r}")
    if value < 0:
        raise AliasError(field, f"expected a weight >= 0, got {value!r} (negative scales are "
                                "not supported)")
    return float(value)


def _lora(value, experts: list[str]) -> dict[str, float]:
    if not isinstance(value, list):
        raise AliasError("lora", f"expected a list of {{\"id\", \"scale\"}} objects, got {value!r}")
    out: dict[str, float] = {}
    for item in value:
        if not isinstance(item, dict) or set(item) != {"id", "scale"}:
            raise AliasError("lora", f"expected {{\"id\": int, \"scale\": number}}, got {item!r}")
        i = item["id"]
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(experts):
            raise AliasError("lora", f"id {i!r}: expected an integer 0..{len(experts) - 1} "
                                     "(GET /lora-adapters lists them)")
        if experts[i] in out:
            raise AliasError("lora", f"id {i} is listed twice")
        out[experts[i]] = _weight("lora", item["scale"])
    return out


def _merged(value, experts: list[str]) -> dict[str, float]:
    field = "merged_adapters"
    if not isinstance(value, dict):
        raise AliasError(field, f"expected an object with ids and weights, got {value!r}")
    extra = set(value) - {"ids", "weights", "merge_strategy", "density", "majority_sign_method"}
    if extra:
        raise AliasError(field, f"unknown field(s) {', '.join(sorted(extra))}")
    strategy = value.get("merge_strategy", "linear")
    if strategy != "linear":
        raise AliasError(field, f"merge_strategy {strategy!r}: only 'linear' is supported "
                                "(pf-serve sums the adapters exactly; no sparsifying merge)")
    if value.get("density", 1.0) != 1.0:
        raise AliasError(field, f"density {value['density']!r}: only 1.0 (no pruning) is supported")
    ids, weights = value.get("ids"), value.get("weights")
    if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
        raise AliasError(field, f"ids: expected a non-empty list of expert names, got {ids!r}")
    if not isinstance(weights, list) or len(weights) != len(ids):
        raise AliasError(field, f"weights: expected a list of {len(ids)} numbers (one per id), "
                                f"got {weights!r}")
    out: dict[str, float] = {}
    for name, w in zip(ids, weights):
        if name not in experts:
            raise AliasError(field, f"unknown expert {name!r}; this bank's experts are: "
                                    f"{', '.join(experts)}")
        if name in out:
            raise AliasError(field, f"expert {name!r} is listed twice")
        out[name] = _weight(field, w)
    return out
