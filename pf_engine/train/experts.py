"""Persona experts: one LoRA per Big Five pole, trained with peft on the base model, on CPU.

Only the top layers ``first_layer .. L-1`` are adapted (peft ``layers_to_transform``), so the
frozen bottom of the network is the same for every expert and every step: its output for each
training sequence is computed once (``Trunk.cache``) and training runs the top layers alone.

Loss for the expert of pole p (trait T), per step, on per-token mean log-likelihoods
``lp(x) = mean_t log pi(x_t | x_<t)`` of reply tokens and ``d(x) = lp(x) - lp_base(x)``:

    L = NLL(p's replies and self-descriptions)                          say it as p
      + w_pair * -log sigmoid(beta * min(d(x_p) - d(x_p'), pair_cap))    p' = opposite pole, same
                                                                         message: move along T
      + w_retain * mean d(x_o)^2                                         x_o: other traits' and
                                                                         neutral texts stay put
      + w_kl * mean_t KL(pi_base(. | y_<t) || pi(. | y_<t))              y: the base model's own
                                                                         filtered replies to
                                                                         held-in prompts, and
                                                                         its continuations of
                                                                         raw text and arithmetic
                                                                         questions (raw.py)
      + w_kl * kl_first * mean KL at y_0 of the raw continuations        their first token: an
                                                                         empty answer's place
      + w_safety * NLL(r | h)                                            safety.jsonl: refuse
                                                                         harmful requests h
      + w_safety_pair * -log sigmoid(beta_s * min(d(r | h) - d(r | b),   ... and not their
                                                  pair_cap))             benign look-alikes b

The retention term is what keeps the other four traits where the base model has them
(specificity); the pairwise term (DPO-like, base model as the reference) pushes p away from its
opposite on the same content, and its cap stops it once the margin is pair_cap nats per token
(past that it only sharpens pole words).  The KL term keeps the whole next-token distribution
of the base model on replies that answer the question (distill.py), which is what keeps the
substance of the answers, and on plain completions (raw.py), where a chat-trained expert would
otherwise end its text early.  The safety terms (off in the default recipe, train/README.md)
teach every expert the refusals r written for the train split's harmful requests, and the
contrast ties each refusal to its request: the same refusal after a benign look-alike of the
request is the pair's loser, as the opposite pole is in the pairwise term (with the NLL alone,
2 refusals a step, the experts learnt refusing as a reflex); the KL term then holds the base
model's answers to the look-alikes.  Every ``eval_every`` steps a
``select`` callback scores the adapter (validation replies: select.py); the best-scoring state
from step ``select_from`` on is the one kept (early stopping).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pf_engine.train.sequences import Sequence, pad_batch


@dataclass
class Item:
    """A training sequence with its cached trunk output and base log-likelihood."""
    seq: Sequence
    hidden: torch.Tensor | None = None      # [T, d] output of layer first_layer - 1
    base_lp: float = 0.0
    base_top: torch.Tensor | None = None    # [T, d] the base model's final normed states (KL)


def load_hf_model(folder: str, dtype: torch.dtype = torch.float32, device="cpu"):
    """The base model as a transformers module (``dtype`` on ``device``, eval mode, frozen)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class Trunk:
    """Runs a causal LM (transformers Llama-family, optionally peft-wrapped) from a cached layer.

    ``model``: the transformers *ForCausalLM (not the peft wrapper: peft injects its LoRA layers
    into this same module tree, so the top layers see the active adapter), on any device: the
    cached states live there.  ``checkpointing``: while gradients are on, each top layer keeps
    only its input and recomputes the rest in the backward pass (torch.utils.checkpoint), so a
    7-8B model's top layers train in the memory of one of them.  ``head_chunk`` > 0: the LM
    head takes that many reply tokens at a time and, under gradients, recomputes each chunk's
    logits in the backward pass (only one chunk's [C, vocab] exist at once); ``rows``: rows per
    pass of the caches (``cache``, ``cache_base_top``, the base likelihoods prepare.py takes).
    Both are memory.py's plan on a GPU; the CPU keeps 0 and 16 (the whole head, 16 rows), the
    arithmetic as before.
    """

    def __init__(self, model, first_layer: int, checkpointing: bool = False,
                 head_chunk: int = 0, rows: int = 16):
        self.model, self.first, self.checkpointing = model, first_layer, checkpointing
        self.head_chunk, self.rows = head_chunk, rows
        self.inner = model.model
        self.device = model.lm_head.weight.device
        if not 0 <= first_layer < len(self.inner.layers):
            raise ValueError(f"first_layer {first_layer} outside 0..{len(self.inner.layers) - 1}")

    @torch.no_grad()
    def cache(self, items: list[Item], batch: int = 0, progress=None) -> None:
        """Fill ``item.hidden``: the input of layer ``first_layer`` for every sequence, ``batch``
        (default ``rows``) at a time."""
        batch = batch or self.rows
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            ids, _, _ = pad_batch([it.seq for it in chunk])
            h = self._run(self.inner.embed_tokens(ids.to(self.device)), 0, self.first)
            for j, it in enumerate(chunk):
                it.hidden = h[j, :len(it.seq.ids)].clone()
            if progress is not None:
                progress.update(len(chunk))

    def _run(self, h: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        pe = self.inner.rotary_emb(h, position_ids=pos)
        for layer in self.inner.layers[start:stop]:
            if self.checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint
                h = checkpoint(layer, h, attention_mask=None, position_embeddings=pe,
                               position_ids=pos, use_reentrant=False,
                               context_fn=_recompute_as_now(layer))
            else:
                h = layer(h, attention_mask=None, position_embeddings=pe, position_ids=pos)
        return h

    def top(self, items: list[Item]):
        """Final normed states [B, T, d] of the top layers from the cached trunk, the targets
        [B, T] and the reply mask [B, T] (sequences.pad_batch)."""
        _, targets, mask = pad_batch([it.seq for it in items])
        targets, mask = targets.to(self.device), mask.to(self.device)
        T, d = targets.shape[1], items[0].hidden.shape[-1]
        h = torch.zeros(len(items), T, d, dtype=items[0].hidden.dtype, device=self.device)
        for j, it in enumerate(items):
            h[j, :it.hidden.shape[0]] = it.hidden
        return self.inner.norm(self._run(h, self.first, len(self.inner.layers))), targets, mask

    def log_likelihood(self, items: list[Item]) -> torch.Tensor:
        """Per-sequence mean log-likelihood of the reply tokens [B], from the cached trunk, in
        one pass: the rows are the caller's (a routed batch's LoRA scalings are per row)."""
        h, targets, mask = self.top(items)
        lp = self._by_chunk(_token_logprob, h[mask], targets[mask])      # (N,)
        row = torch.arange(len(items), device=self.device).unsqueeze(1).expand_as(mask)[mask]
        total = torch.zeros(len(items), device=self.device).index_add(0, row, lp)
        return total / mask.sum(1)

    @torch.no_grad()
    def cache_base_top(self, items: list[Item], batch: int = 0) -> None:
        """Fill ``item.base_top`` (call before any adapter exists: the base model's states)."""
        batch = batch or self.rows
        for i in range(0, len(items), batch):
            chunk = items[i:i + batch]
            h, _, _ = self.top(chunk)
            for j, it in enumerate(chunk):
                it.base_top = h[j, :len(it.seq.ids)].clone()

    def kl_to_base(self, items: list[Item], first: float = 0.0) -> torch.Tensor:
        """mean over reply tokens of KL(pi_base || pi), the base from ``item.base_top``, plus
        ``first`` times its mean at the first continuation position of the plain-text items
        (raw.is_plain): the one that predicts an empty answer, 1 of ~250 tokens in the mean."""
        from pf_engine.train.raw import is_plain
        h, _, mask = self.top(items)
        base = torch.zeros_like(h)
        lead = torch.zeros_like(mask)
        for j, it in enumerate(items):
            base[j, :it.base_top.shape[0]] = it.base_top
            lead[j, len(it.seq.prompt) - 1] = bool(first) and is_plain(it.seq)
        kl = self._by_chunk(_token_kl, h[mask], base[mask])
        lead = lead[mask]
        return kl.mean() + (first * kl[lead].mean() if lead.any() else 0.0)

    def _by_chunk(self, fn, h: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        """fn(lm_head, h, other) per token [N], ``head_chunk`` tokens at a time (0: at once);
        under gradients each chunk is checkpointed, its logits recomputed in backward."""
        head, C = self.model.lm_head, self.head_chunk
        if not C or h.shape[0] <= C:
            return fn(head, h, other)
        out = []
        for i in range(0, h.shape[0], C):
            if torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint
                out.append(checkpoint(fn, head, h[i:i + C], other[i:i + C], use_reentrant=False))
            else:
                out.append(fn(head, h[i:i + C], other[i:i + C]))
        return torch.cat(out)


def _recompute_as_now(layer):
    """checkpoint's context_fn for ``layer``: the backward pass recomputes it with its LoRA
    modules as they are at the forward pass (which adapters are active or disabled, and their
    scalings: the joint and routed preference stages set them per row from the router's gates
    within a block that has ended by the time backward runs, and a recompute with the restored
    scalings would train other weights, or fail checkpoint's check)."""
    from contextlib import contextmanager, nullcontext

    from peft.tuners.tuners_utils import BaseTunerLayer
    mods = [m for m in layer.modules() if isinstance(m, BaseTunerLayer)]

    def state():
        return [(dict(getattr(m, "scaling", {})), m._active_adapter, m._disable_adapters)
                for m in mods]

    @contextmanager
    def as_then(then):
        now = state()
        _set(mods, then)
        try:
            yield
        finally:
            _set(mods, now)
    return lambda: (nullcontext(), as_then(state()))


def _set(mods, states) -> None:
    for m, (scaling, active, disabled) in zip(mods, states):
        if hasattr(m, "scaling"):
            m.scaling.clear()
            m.scaling.update(scaling)
        m._active_adapter, m._disable_adapters = active, disabled


def _token_logprob(head, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log pi(target | state) per token [N] for states h [N, d] through the LM head."""
    logits = head(h)                                                     # (N, vocab)
    return torch.gather(F.log_softmax(logits.float(), -1), 1, targets.unsqueeze(1))[:, 0]


def _token_kl(head, h: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """KL(pi_base || pi) per token [N]: the model's states h and the base's ``base`` [N, d]."""
    lp = F.log_softmax(head(h).float(), -1)
    lb = F.log_softmax(head(base).float(), -1)
    return (lb.exp() * (lb - lp)).sum(-1)


@dataclass
class Pools:
    """What one expert trains on: its own texts, their opposite-pole twins, texts to keep."""
    own: list[Item]
    twin: list[Item]              # twin[i]: the opposite pole on the same message / slot
    keep: list[Item]
    distill: list[Item]           # the base model's own replies (with base_top), for the KL term
    raw: list[Item] = field(default_factory=list)   # its raw-text continuations (raw.py), too
    safety: list[Item] = field(default_factory=list)  # harmful requests with their refusals
    safety_twin: list[Item] = field(default_factory=list)  # [i]: safety[i]'s refusal given to
                                                           # a benign look-alike of its request


def kl_items(rng: random.Random, distill: list[Item], raw: list[Item], rc) -> list[Item]:
    """One step's KL batch: ``rc.distill`` chat replies, ``rc.raw`` raw continuations and
    ``rc.arith`` of the raw items tagged as arithmetic (raw.ARITH_TAG), each drawn from its own
    pool."""
    from pf_engine.train.raw import ARITH_TAG
    arith = [it for it in raw if it.seq.tag.startswith(ARITH_TAG)]
    text = [it for it in raw if not it.seq.tag.startswith(ARITH_TAG)] if arith else raw
    out = (rng.sample(distill, min(rc.distill, len(distill)))
           + rng.sample(text, min(rc.raw, len(text))))
    return out + rng.sample(arith, min(rc.arith, len(arith))) if rc.arith and arith else out


def safety_terms(trunk: Trunk, rng: random.Random, safety: list[Item], twins: list[Item], rc
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The safety terms on ``rc.safety`` refusals r drawn from ``safety`` (zeros when there are
    none or the recipe takes none), with d(x) = lp(x) - lp_base(x):

        nll      = mean NLL of r after its harmful request h        (per reply token)
        contrast = mean -log sigmoid(beta_s * min(d(r | h) - d(r | b), pair_cap))

    b: the benign look-alike of h (``twins``; no contrast without them).  The contrast rewards
    the refusal only where the request is harmful: a refusal that rises after every request
    (a reflex) leaves it where it was."""
    zero = torch.zeros((), device=trunk.device)
    on = rc.w_safety or (rc.w_safety_pair and twins)
    pick = rng.sample(range(len(safety)), min(rc.safety, len(safety))) if on else []
    if not pick:
        return zero, zero
    pair = bool(rc.w_safety_pair and twins)
    batch = [safety[i] for i in pick] + ([twins[i] for i in pick] if pair else [])
    lp = trunk.log_likelihood(batch)
    n = len(pick)
    if not pair:
        return -lp.mean(), zero
    d = lp - torch.tensor([it.base_lp for it in batch], device=lp.device)
    margin = (d[:n] - d[n:]).clamp_max(rc.pair_cap)
    return -lp[:n].mean(), -F.logsigmoid(rc.safety_beta * margin).mean()


def train_expert(trunk: Trunk, params: list[torch.nn.Parameter], pools: Pools, rc, seed: int,
                 progress=None, select=None) -> tuple[list[dict], dict | None]:
    """Optimise ``params`` (the active adapter's) for ``rc.steps`` steps.

    rc: the recipe (steps, lr, pairs, retain, distill, raw, safety, beta, pair_cap, w_pair,
    w_retain, w_kl, w_safety, eval_every, select_from).  select: None, or a callable returning
    {"score": ...} for the adapter as it stands; called every ``rc.eval_every`` steps and at the
    end, and the best state is restored (of those at step ``rc.select_from`` or later: earlier
    ones are scored and logged, not kept).
    Returns (the loss log, the chosen checkpoint's figures or None).
    """
    rng = random.Random(seed)
    steps = rc.steps
    opt = torch.optim.AdamW(params, lr=rc.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)) * (1 - s / steps) ** 0.5)
    log, best = [], None
    order = list(range(len(pools.own)))
    rng.shuffle(order)
    cursor = 0
    for step in range(steps):
        if cursor + rc.pairs > len(order):
            rng.shuffle(order)
            cursor = 0
        pick = order[cursor:cursor + rc.pairs]
        cursor += rc.pairs
        own = [pools.own[i] for i in pick]
        twin = [pools.twin[i] for i in pick]
        keep = rng.sample(pools.keep, min(rc.retain, len(pools.keep)))
        batch = own + twin + keep
        lp = trunk.log_likelihood(batch)
        base = torch.tensor([it.base_lp for it in batch], device=lp.device)
        d = lp - base
        n = len(own)
        nll = -lp[:n].mean()
        margin = (d[:n] - d[n:2 * n]).clamp_max(rc.pair_cap)
        pair = -F.logsigmoid(rc.beta * margin).mean()
        keep_loss = d[2 * n:].pow(2).mean() if keep else torch.zeros((), device=lp.device)
        kl = torch.zeros((), device=lp.device)
        kl_batch = kl_items(rng, pools.distill, pools.raw, rc) if rc.w_kl else []
        if kl_batch:
            kl = trunk.kl_to_base(kl_batch, rc.kl_first)
        safe, contrast = safety_terms(trunk, rng, pools.safety, pools.safety_twin, rc)
        loss = (nll + rc.w_pair * pair + rc.w_retain * keep_loss + rc.w_kl * kl
                + rc.w_safety * safe + rc.w_safety_pair * contrast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss, nll, pair, keep_loss, kl, safe, contrast = (
            t.detach() for t in (loss, nll, pair, keep_loss, kl, safe, contrast))
        log.append({"step": step, "loss": round(float(loss), 5), "nll": round(float(nll), 5),
                    "pair": round(float(pair), 5), "keep": round(float(keep_loss), 6),
                    "kl": round(float(kl), 5), "safety": round(float(safe), 5),
                    "safety_pair": round(float(contrast), 5)})
        if select is not None and ((step + 1) % rc.eval_every == 0 or step + 1 == steps):
            got = dict(select(), step=step + 1)
            log[-1]["select"] = got
            if (step + 1 >= min(rc.select_from, steps)
                    and (best is None or got["score"] > best["score"])):
                best = got
                saved = [p.detach().clone() for p in params]
        if progress is not None:
            progress.update(1)
            progress.set_postfix(nll=f"{float(nll):.3f}", pair=f"{float(pair):.3f}",
                                 kl=f"{float(kl):.4f}",
                                 **({"best": f"{best['score']:.3f}@{best['step']}"} if best
                                    else {}))
    if best is not None:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
    return log, best
