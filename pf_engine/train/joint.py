"""pf-train's joint stage: the experts and the sequence router trained together on the routed
mixture (PersonaFuse's third stage), so the experts learn to work at the weights ``auto`` gives
them (about 0.3-0.4 each, two at a time) rather than at 1.0 alone.

For a train situation s with target mix t_s over the K poles and none, and router features x_s
(its prompt's pooled states at the router's layer, from the served engine: what ``auto`` reads):

    p_s = softmax(W2 silu(W1 x_s + b1) + b2)               [K+1]  the router's outputs
    g_s = router.gates(p_s)                                [K]    top-k renormalised x strength
    mixture s: every adapted projection  y = W x + sum_k g_s[k] (alpha / r) B_k A_k x

    L = KL(t_s || p_s)                                                 the routing stays put
      + w_pair * -log sigmoid(beta * min(d_s(x_p) - d_s(x_p'), pair_cap))
                    p ~ t_s a called-for pole, x_p one of its texts, x_p' the opposite pole's
                    twin, d_s(x) = lp under mixture s - lp under the base: the called-for trait
                    shows at the weights auto gives (none-only situations: no such term)
      + w_kl * KL(pi_base || pi_mixture_s) on the base model's own reply to s (a random kept
                    base reply where s has none; none kept at all: no term): the routed
                    mixture keeps the answer

averaged over a batch of ``joint_batch`` situations; gradients reach every expert's A and B and
the router's W1, b1, W2, b2 (its strength calibration stays as fitted).  Every ``joint_val``-th
train situation is kept out and scored (the same loss, every called-for pole at its weight, no
sampling) before and after; the stage is kept only if that held-out loss fell.

The mixture runs through peft with every adapter active and each LoRA layer's ``scaling[name]``
set to a [B, 1, 1] tensor g[:, k] * alpha / r for the step (``routed``), so one padded batch
holds rows routed differently, as the engine's batches do.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pf_engine.persona.router import SequenceRouter
from pf_engine.train.data import opposite
from pf_engine.train.router import target_kl


@contextmanager
def routed(pm, names: list[str], gates: torch.Tensor):
    """Within: ``pm`` (a peft model) runs each batch row b with every adapter k at weight
    gates[b, k] (gates [B, K], may carry gradients).  Every adapter stays active (and
    trainable) afterwards, so a backward pass after the block reaches them all; the scalings
    are restored."""
    from peft.tuners.lora import LoraLayer
    layers = [m for m in pm.modules() if isinstance(m, LoraLayer)]
    saved = [dict(m.scaling) for m in layers]
    pm.base_model.set_adapter(list(names))
    try:
        for m, s in zip(layers, saved):
            for k, n in enumerate(names):
                if n in s:
                    m.scaling[n] = gates[:, k].reshape(-1, 1, 1) * s[n]
        yield
    finally:
        for m, s in zip(layers, saved):
            m.scaling.clear()
            m.scaling.update(s)


@dataclass
class Example:
    """One train situation for the joint stage."""
    x: torch.Tensor              # [d] pooled features at the router's layer
    target: torch.Tensor         # [K+1] target mix (none last)
    reply: object                # the base model's kept reply to it (experts.Item) or None


class JointLoss:
    """The module doc's L for a batch of examples, with the router's tensors as leaves."""

    def __init__(self, trunk, pm, names, router: SequenceRouter, items: dict, poles: list[str],
                 distill: list, rc):
        self.trunk, self.pm, self.names, self.rc = trunk, pm, names, rc
        self.items, self.poles, self.distill = items, poles, distill
        self.router = SequenceRouter(*(t.detach().clone().requires_grad_() for t in
                                       (router.w1, router.b1, router.w2, router.b2)),
                                     layer=router.layer, temperature=router.temperature,
                                     top_k=router.top_k, none=router.none, strength=router.strength)

    @property
    def router_params(self) -> list[torch.Tensor]:
        r = self.router
        return [r.w1, r.b1, r.w2, r.b2]

    def __call__(self, batch: list[Example], rng: random.Random | None = None) -> dict:
        """{"loss", "router", "pair", "kl"} (tensors).  rng None: every called-for pole at its
        target weight and its first text (the held-out score); else one pole drawn by weight."""
        K = len(self.poles)
        x = torch.stack([e.x for e in batch])
        t = torch.stack([e.target for e in batch])
        p = self.router.probabilities(x)
        router_kl = target_kl(t, p.clamp_min(1e-12).log())
        g = self.router.gates(p)                                       # [B, K]
        own, twin, rows, weights = [], [], [], []
        for b, e in enumerate(batch):
            for k, w in self._called(e.target[:K], rng):
                i = (rng.randrange(len(self.items[self.poles[k]])) if rng else 0)
                own.append(self.items[self.poles[k]][i])
                twin.append(self.items[opposite(self.poles[k])][i])
                rows.append(b)
                weights.append(w)
        dev = self.trunk.device
        g = g.to(dev)
        pair = torch.zeros((), device=dev)
        if rows:
            gp = g[torch.tensor(rows + rows, device=dev)]
            with routed(self.pm, self.names, gp):
                lp = self.trunk.log_likelihood(own + twin)
            d = lp - torch.tensor([it.base_lp for it in own + twin], device=dev)
            n = len(own)
            margin = (d[:n] - d[n:]).clamp_max(self.rc.pair_cap)
            w = torch.tensor(weights, device=dev)
            pair = (w * -F.logsigmoid(self.rc.beta * margin)).sum() / w.sum()
        pool = self.distill or [None]
        replies = [e.reply if e.reply is not None else
                   (rng.choice(pool) if rng else pool[b % len(pool)]) for b, e in enumerate(batch)]
        keep = [b for b, r in enumerate(replies) if r is not None]
        kl = torch.zeros((), device=dev)
        if keep:                 # no kept base reply at all (a tiny random model): no KL term
            with routed(self.pm, self.names, g[torch.tensor(keep, device=dev)]):
                kl = self.trunk.kl_to_base([replies[b] for b in keep])
        loss = router_kl.to(dev) + self.rc.w_pair * pair + self.rc.w_kl * kl
        return {"loss": loss, "router": router_kl, "pair": pair, "kl": kl}

    @staticmethod
    def _called(t: torch.Tensor, rng) -> list[tuple[int, float]]:
        """(pole index, weight) pairs the pairwise term uses for target row t [K]."""
        ks = [k for k in range(len(t)) if t[k] > 0]
        if not ks or rng is None:
            return [(k, float(t[k])) for k in ks]
        return [(rng.choices(ks, weights=[float(t[k]) for k in ks])[0], 1.0)]


def _score(loss: JointLoss, val: list[Example]) -> dict:
    with torch.no_grad():
        out = {}
        for i in range(0, len(val), 8):
            part = loss(val[i:i + 8])
            for k, v in part.items():
                out[k] = out.get(k, 0.0) + float(v) * len(val[i:i + 8]) / len(val)
        return {k: round(v, 5) for k, v in out.items()}


def joint_stage(trunk, pm, names: list[str], router: SequenceRouter, examples: list[Example],
                items: dict, poles: list[str], distill: list, rc, seed: int, progress=None
                ) -> tuple[SequenceRouter, dict]:
    """Train the experts of ``pm`` and ``router`` together (module doc); returns the router
    (the trained one if the stage was kept, else the one given) and the stage's figures."""
    val = examples[::rc.joint_val] if rc.joint_val else []
    train = [e for i, e in enumerate(examples) if not rc.joint_val or i % rc.joint_val]
    loss_fn = JointLoss(trunk, pm, names, router, items, poles, distill, rc)
    pm.base_model.set_adapter(list(names))                # every expert active and trainable
    lora = [p for n, p in pm.named_parameters() if "lora_" in n]
    saved = [p.detach().clone() for p in lora]
    before = _score(loss_fn, val) if val else None
    opt = torch.optim.AdamW([{"params": lora, "lr": rc.joint_lr},
                             {"params": loss_fn.router_params, "lr": rc.joint_router_lr}],
                            weight_decay=0.0)
    rng = random.Random(seed)
    log = []
    for step in range(rc.joint_steps):
        parts = loss_fn(rng.sample(train, min(rc.joint_batch, len(train))), rng)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(lora + loss_fn.router_params, 1.0)
        opt.step()
        log.append({"step": step, **{k: round(v.item(), 5) for k, v in parts.items()}})
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{log[-1]['loss']:.3f}")
    after = _score(loss_fn, val) if val else None
    kept = before is None or after["loss"] < before["loss"]
    report = {"steps": rc.joint_steps, "situations": len(train), "validation": len(val),
              "validation_before": before, "validation_after": after, "kept": kept, "log": log}
    pm.set_adapter(names[0])
    if not kept:
        with torch.no_grad():
            for p, v in zip(lora, saved):
                p.copy_(v)
        return router, report
    r = loss_fn.router
    return SequenceRouter(*(t.detach() for t in (r.w1, r.b1, r.w2, r.b2)), layer=r.layer,
                          temperature=r.temperature, top_k=r.top_k, none=r.none,
                          strength=r.strength), report
