"""Experts added to, replaced in or removed from a bank at run time (pf-serve's
/v1/load_lora_adapter and /v1/unload_lora_adapter, Engine.load_expert / unload_expert): each
returns a new AdapterBank, the old one unchanged (requests in flight keep it).

A bank stores per (layer, module) its experts' A stacked [sum of ranks, d_in] and B [d_out, sum of
ranks], in the order of ``module_experts[module]`` (bank.py).  ``split`` takes that apart into one
Expert per name, ``assemble`` stacks Experts back, so an edit is a list operation:

    with_expert(bank, expert)     expert's name in the bank: replaced in place (same position);
                                  else added last
    without_expert(bank, name)    removed (the last one cannot be: unload the bank instead)

The routers output one gate per expert: a replacement keeps them (K unchanged, the router still
names the same positions), an addition or removal drops them (``auto`` and ``token`` need a
router trained for the new experts; pf-serve's model ids follow).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pf_engine.errors import PFError


@dataclass
class Expert:
    """One expert of a bank: its rank, scaling (alpha / r, or alpha / sqrt(r) with rsLoRA) and
    its A [r, d_in] and B [d_out, r] per (layer, module) it adapts."""
    name: str
    rank: int
    scaling: float
    alpha: float | None
    rslora: bool | None
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def split(bank) -> list[Expert]:
    """The bank's experts, in order, each with its own slices of the stacked A and B."""
    out = [Expert(n, bank.ranks[k], bank.scalings[k],
                  bank.lora_alpha[k] if bank.lora_alpha else None,
                  bank.use_rslora[k] if bank.use_rslora else None, {})
           for k, n in enumerate(bank.expert_names)]
    for (layer, module), (a, b) in bank._weights.items():
        off = 0
        for k in bank.module_experts[module]:
            r = bank.ranks[k]
            out[k].weights[(layer, module)] = (a[off:off + r], b[:, off:off + r])
            off += r
    return out


def assemble(bank, experts: list[Expert], keep_routers: bool):
    """A new bank of ``experts`` (in order) for the same base model as ``bank``."""
    from pf_engine.persona.bank import MODULES, AdapterBank
    modules = {m: [k for k, e in enumerate(experts) if any(mm == m for _, mm in e.weights)]
               for m in MODULES}
    keys = sorted({key for e in experts for key in e.weights})
    weights = {}
    for layer, m in keys:
        parts = [(e.weights.get((layer, m)), e) for e in (experts[k] for k in modules[m])]
        d_out, d_in = _shape(parts, layer, m)
        a = [ab[0] if ab else torch.zeros(e.rank, d_in, dtype=bank.dtype, device=bank.device)
             for ab, e in parts]
        b = [ab[1] if ab else torch.zeros(d_out, e.rank, dtype=bank.dtype, device=bank.device)
             for ab, e in parts]
        weights[(layer, m)] = (torch.cat(a, 0).contiguous(), torch.cat(b, 1).contiguous())
    alphas = [e.alpha for e in experts]
    rs = [e.rslora for e in experts]
    return AdapterBank([e.name for e in experts], [e.rank for e in experts],
                       [e.scaling for e in experts], bank.fingerprint, modules, weights,
                       router=bank.router if keep_routers else None,
                       token_router=bank.token_router if keep_routers else None,
                       lora_alpha=None if None in alphas else alphas,
                       use_rslora=None if None in rs else rs)


def _shape(parts, layer: int, module: str) -> tuple[int, int]:
    for ab, _ in parts:
        if ab is not None:
            return ab[1].shape[0], ab[0].shape[1]
    raise PFError(f"no expert adapts {module} in layer {layer}")


def with_expert(bank, expert: Expert):
    """``bank`` with ``expert`` replacing the one of its name (routers kept), or added last
    (routers dropped)."""
    expert = replace(expert, weights={k: (a.to(bank.dtype), b.to(bank.dtype))
                                      for k, (a, b) in expert.weights.items()})   # not the caller's
    experts = split(bank)
    names = [e.name for e in experts]
    if expert.name in names:
        experts[names.index(expert.name)] = expert
        return assemble(bank, experts, keep_routers=True)
    return assemble(bank, experts + [expert], keep_routers=False)


def without_expert(bank, name: str):
    """``bank`` without expert ``name`` (routers dropped); a PFError naming the experts if it
    has none of that name, or if it is the last one."""
    if name not in bank.expert_names:
        raise PFError(f"no expert {name!r}; this bank's experts are: "
                      f"{', '.join(bank.expert_names)}")
    if bank.num_experts == 1:
        raise PFError(f"{name!r} is the bank's only expert: unload the bank instead")
    return assemble(bank, [e for e in split(bank) if e.name != name], keep_routers=False)
