"""pf-train ``--from BANK``: continue from a trained bank instead of training its experts anew.

The bank's experts are copied into fresh peft adapters of the same shape (its recipe's rank,
alpha, modules and first adapted layer), its sequence router is kept, and only the stages that
come after the joint one run (routed_pref.py).  The bank written keeps the starting bank's
recipe and figures, with ``continued_from`` (its digest, commit and training time) and the new
stages' figures added, so a bank made in two runs says so.
"""
from __future__ import annotations

import dataclasses
import os

import torch

from pf_engine.errors import PFError
from pf_engine.model.config import HF_MODULE_NAMES

ARCH_FIELDS = ("rank", "alpha", "modules", "first_layer")   # what the adapters' shape needs


def load_start(path: str, poles: list[str], recipe):
    """(the bank at ``path`` as stored, the recipe with its ARCH_FIELDS), or a PFError naming
    what does not fit: no such bank, no sequence router, no pf-train recipe, other poles."""
    from pf_engine.persona.bank import AdapterBank, resolve_bank
    path = resolve_bank(path)                      # a LoadError (a PFError) if there is none
    bank = AdapterBank.load(path)
    made = (bank.recipe or {}).get("recipe")
    if not made:
        raise PFError(f"--from {path}: the bank has no pf-train recipe in its metadata, so the "
                      "shape of its adapters is unknown")
    if bank.router is None:
        raise PFError(f"--from {path}: the bank has no sequence router to continue with")
    if list(bank.expert_names) != list(poles):
        raise PFError(f"--from {path}: its experts {bank.expert_names} are not the corpus's "
                      f"poles {poles}")
    arch = {k: tuple(made[k]) if isinstance(made[k], list) else made[k]
            for k in ARCH_FIELDS if k in made}
    return bank, dataclasses.replace(recipe, **arch)


def bank_into_peft(bank, pm, names: list[str]) -> int:
    """Copy expert k of ``bank`` into peft adapter ``names[k]`` of ``pm`` in every adapted
    layer (lora_A <- its A [r, d_in], lora_B <- its B [d_out, r]; layers the bank stores
    nothing for get zeros); returns the number of (layer, module, expert) blocks copied."""
    from peft.tuners.lora import LoraLayer
    short = {v.split(".")[-1]: k for k, v in HF_MODULE_NAMES.items()}
    copied = 0
    with torch.no_grad():
        for full, mod in pm.named_modules():
            if not isinstance(mod, LoraLayer):
                continue
            parts = full.split(".")
            layer, module = int(parts[parts.index("layers") + 1]), short[parts[-1]]
            lw = bank.lora(layer, module)
            for k, name in enumerate(names):
                if name not in mod.lora_A:
                    continue
                a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
                ids = lw.expert_ids.tolist() if lw is not None else []
                if k not in ids:
                    a.zero_()
                    b.zero_()
                    continue
                j = ids.index(k)
                lo, hi = (int(x) for x in lw.rank_offsets[j:j + 2])
                if (hi - lo, bank.scalings[k]) != (a.shape[0], mod.scaling[name]):
                    raise PFError(f"bank expert {bank.expert_names[k]} has rank {hi - lo}, "
                                  f"scaling {bank.scalings[k]:g}; the adapter expects "
                                  f"{a.shape[0]}, {mod.scaling[name]:g}")
                a.copy_(lw.a[lo:hi].to(a))
                b.copy_(lw.b[:, lo:hi].to(b))
                copied += 1
    return copied


def continued_figures(bank, path: str) -> dict:
    """The starting bank's figures for the new bank's metadata, with where they came from."""
    made = dict(bank.recipe)
    start = {"bank": os.path.basename(path), "digest": bank.digest,
             "commit": made.get("commit"), "train_seconds": made.get("train_seconds"),
             "recipe": made.get("recipe")}
    keep = {k: v for k, v in made.items()
            if k not in ("recipe", "quick", "data_sha256", "seed", "versions", "commit",
                         "dirty", "cpu", "threads", "train_seconds", "traits")}
    return {**keep, "continued_from": start}
