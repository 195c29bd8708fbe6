"""Banks and experts loaded and unloaded at run time (Engine.load_bank, unload_bank, load_expert,
unload_expert; pf-serve's /v1/load_lora_adapter and /v1/unload_lora_adapter).

A change swaps the engine's bank between requests, never under one: ``swap`` holds the
scheduler's lock and refuses (RequestError) while any request is in flight, so every request runs
start to end on one bank (pf-serve drains first: serve/adapters.py).  Then, in order:

    engine.bank = new; the model's projections re-attached (the backend's packed experts rebuilt,
    the old ones freed); the scheduler rebuilt with its settings (its gate rows are K wide); the
    prefix cache emptied, and its keys carry the bank's content hash (AdapterBank.digest,
    prefix_cache.persona_root) besides: KV computed under a replaced expert is never served.

The new bank is checked against the model (AdapterBank.for_model's checks) and converted to the
engine's dtype and device before anything changes: a bad file is one error, and the old bank
stays.  Not under tensor parallelism (every rank holds its share of the experts).
"""
from __future__ import annotations

import os

from pf_engine.errors import PFError, RequestError
from pf_engine.persona import bank_edit


def checked(engine, adapters):
    """A bank (a path, a shipped name or an AdapterBank) for ``engine``'s model, in its dtype and
    on its device; LoadError / PFError naming the file or the mismatch."""
    from pf_engine.persona.bank import AdapterBank
    bank = adapters.for_model(engine.config) if isinstance(adapters, AdapterBank) \
        else AdapterBank.load(os.fspath(adapters), engine.config)
    return bank.to(dtype=engine.dtype, device=engine.device)


def expert_from(engine, name: str, source) -> bank_edit.Expert:
    """Expert ``name`` read from ``source``: a PEFT LoRA folder (adapter_config.json), or a bank
    file holding an expert of that name (or a single expert, renamed)."""
    from pf_engine.persona.bank import AdapterBank
    path = os.fspath(source)
    bank = checked(engine, AdapterBank.from_peft(engine.config, {name: path})
                   if os.path.isdir(path) else path)
    if name not in bank.expert_names and bank.num_experts != 1:
        raise PFError(f"{path}: no expert {name!r} among {', '.join(bank.expert_names)}")
    k = bank.expert_names.index(name) if name in bank.expert_names else 0
    expert = bank_edit.split(bank)[k]
    expert.name = name                     # a single expert takes the name it is loaded as
    return expert


def swap(engine, new) -> None:
    """Make ``new`` (an AdapterBank or None) the engine's bank between requests; see the module
    doc.  RequestError while requests are in flight; PFError under tensor parallelism."""
    if engine.tensor_parallel > 1:
        raise PFError("banks cannot change at run time under tensor parallelism: restart with "
                      "the new bank")
    sched = getattr(engine, "_scheduler", None)
    if sched is not None:
        sched.lock.acquire()
    try:
        if sched is not None and sched.pending():
            raise RequestError("requests are in flight: a bank changes between requests (wait "
                               "for them, or cancel them)")
        engine.bank = new
        if new is None:
            engine.model.detach()
        else:
            engine.model.attach(new)
        engine.describe_weights()
        if sched is not None:
            engine._scheduler = None
            engine.new_scheduler(**sched.config.settings())
        engine.set_prefix_cache(engine.prefix_cache_gb)
    finally:
        if sched is not None:
            sched.lock.release()


def load_expert(engine, name: str, source) -> None:
    """Add expert ``name`` from ``source`` to the engine's bank, or replace the one of that
    name (a bank of it alone when there is none)."""
    expert = expert_from(engine, name, source)
    if engine.bank is None:
        from pf_engine.persona.bank import AdapterBank
        weights = {k: (a, b) for k, (a, b) in expert.weights.items()}
        modules = sorted({m for _, m in weights})
        new = AdapterBank([name], [expert.rank], [expert.scaling], engine.config.fingerprint(),
                          {m: [0] for m in modules}, weights)
    else:
        new = bank_edit.with_expert(engine.bank, expert)
    swap(engine, new)


def unload_expert(engine, name: str) -> None:
    """Remove expert ``name`` from the engine's bank (its last expert: the bank)."""
    if engine.bank is None:
        raise PFError(f"no bank is loaded, so no expert {name!r}")
    if engine.bank.expert_names == [name]:
        return swap(engine, None)
    swap(engine, bank_edit.without_expert(engine.bank, name))
