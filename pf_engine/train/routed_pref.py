"""pf-train's routed preference stage: on-policy DPO for ``auto`` itself, the routed mixture of
experts, on train situations that call for a persona (after the joint stage).

Why: the per-expert preference stage (preference.py) tunes each expert alone at weight 1.0, but
users get ``auto``: two experts at the router's weights (about 0.3-0.4 each).  pf-eval's "trait
moved" asks whether auto's reply to a situation shows the called-for pole more than the base
model's; this stage samples auto's own replies and prefers the ones that do, while they still
answer and do not loop.

For a train situation s (target t_s over the K poles, leading pole p_s = argmax t_s, router
features x_s) with auto's gates g_s = router.gates(router.probabilities(x_s)) [K] (the router
frozen):

  1. sample k replies y_1..y_k to s from the mixture at g_s (temperature ``pref_temperature``);
  2. score each as the per-expert stage does (select.reply_scores: relevance to s by the
     independent encoder, minus 2 if degenerate, plus W_TRAIT times p_s's trait probability
     under the train split's classifier for p_s's trait);
  3. pair per situation (preference.build_pairs: the best non-degenerate reply against the
     worst, a degenerate one whenever there is one);
  4. train every expert's A and B, with lp_g(y | s) the per-token mean log-likelihood under the
     mixture at g_s and lp_ref the same before the stage (computed once):

        L = -log sigmoid(beta * ((lp_g(y_w) - lp_ref(y_w)) - (lp_g(y_l) - lp_ref(y_l))))
          + w_kl * KL(pi_base || pi_mixture_g) on the base model's own reply to s, where it
                   has a kept one (joint.py's term: the routed mixture keeps the answer)

  5. keep the result only if the held-out score did not fall: auto's greedy replies to every
     ``joint_val``-th train situation (kept out of steps 1-4), scored as in step 2, averaged.
     Reported beside it: the share of those where auto's reply shows p_s more than the base
     model's greedy reply does (the held-out "trait moved" of pf-eval, on train situations).

Metrics (bank.recipe["routed_preference"]): situations sampled, samples, their degenerate share
and mean score, pairs, the chosen/rejected scores, the implicit reward margin after, the held-out
score and moved share before and after, whether it was kept.
"""
from __future__ import annotations

import random

import torch

from pf_engine.train.data import lead_pole, trait_of
from pf_engine.train.experts import Item
from pf_engine.train.joint import routed
from pf_engine.train.metrics import mean
from pf_engine.train.preference import build_pairs, dpo_loss
from pf_engine.train.select import VAL_TOKENS, generate, reply_scores
from pf_engine.train.sequences import Sequence


class Mixture:
    """auto's mixture on the trunk's peft model ``pm`` (adapters ``names``, in the router's
    order): generation and log-likelihoods with each row at its own gates [K]."""

    def __init__(self, trunk, pm, names: list[str], enc):
        self.trunk, self.pm, self.names, self.enc = trunk, pm, names, enc

    def generate(self, prompts: list[list[int]], gates: torch.Tensor, tokens: int,
                 samples: int = 0, temperature: float = 1.0, seed: int = 0) -> list:
        """select.generate's (ids, ended) rows, row i (prompt-major) at gates[prompt of i]."""
        g = gates.repeat_interleave(max(1, samples), 0).to(self.trunk.device)
        with routed(self.pm, self.names, g):
            return generate(self.trunk.model, prompts, self.enc.end, tokens, samples,
                            temperature, seed)

    def base_generate(self, prompts: list[list[int]], tokens: int) -> list:
        """The base model's greedy rows (every adapter off)."""
        with self.pm.disable_adapter():
            return generate(self.trunk.model, prompts, self.enc.end, tokens)

    def log_likelihood(self, items: list[Item], gates: torch.Tensor) -> torch.Tensor:
        """Per-sequence mean log-likelihood [B] of the replies, row b at gates[b]."""
        with routed(self.pm, self.names, gates.to(self.trunk.device)):
            return self.trunk.log_likelihood(items)

    def kl_to_base(self, items: list[Item], gates: torch.Tensor) -> torch.Tensor:
        with routed(self.pm, self.names, gates.to(self.trunk.device)):
            return self.trunk.kl_to_base(items)

    def text(self, row) -> str:
        return self.enc.hf.decode(row[0], skip_special_tokens=True).strip()


def situation_scores(texts: list[str], replies: list[str], leads: list[str], encoder,
                     classifiers: dict) -> list[dict]:
    """select.reply_scores per row, each with its own leading pole's trait classifier."""
    out: list[dict | None] = [None] * len(texts)
    for pole in sorted(set(leads)):
        rows = [i for i, p in enumerate(leads) if p == pole]
        got = reply_scores([texts[i] for i in rows], [replies[i] for i in rows], encoder,
                           classifiers[trait_of(pole)], pole)
        for i, g in zip(rows, got):
            out[i] = g
    return out


class HeldOut:
    """Step 5's score: auto's greedy replies to the held-out situations against the base's."""

    def __init__(self, mix: Mixture, sits: list[dict], gates: torch.Tensor, encoder,
                 classifiers: dict):
        self.mix, self.sits, self.gates = mix, sits, gates
        self.encoder, self.classifiers = encoder, classifiers
        self.prompts = [mix.enc.prompt(s["text"]) for s in sits]
        self.leads = [lead_pole(s["target"]) for s in sits]
        self.base = (self._scores([mix.text(r) for r in
                                   mix.base_generate(self.prompts, VAL_TOKENS)])
                     if sits else [])

    def _scores(self, replies: list[str]) -> list[dict]:
        return situation_scores([s["text"] for s in self.sits], replies, self.leads,
                                self.encoder, self.classifiers)

    def __call__(self) -> dict:
        if not self.sits:
            return {"score": 0.0, "moved": 0.0, "degenerate": 0.0}
        got = self._scores([self.mix.text(r) for r in
                            self.mix.generate(self.prompts, self.gates, VAL_TOKENS)])
        return {"score": round(mean([g["score"] for g in got]), 5),
                "moved": round(mean([float(g["trait"] > b["trait"])
                                     for g, b in zip(got, self.base)]), 4),
                "degenerate": round(mean([g["degenerate"] for g in got]), 4)}


def _sample_pairs(mix: Mixture, sits: list[dict], gates: torch.Tensor, encoder, classifiers,
                  rc, seed: int) -> tuple[list, list, dict]:
    """Steps 1-3: (chosen items with their gates rows, rejected ones, the sampling figures)."""
    k = rc.pref_samples
    prompts = [mix.enc.prompt(s["text"]) for s in sits]
    out = mix.generate(prompts, gates, rc.pref_tokens, samples=k,
                       temperature=rc.pref_temperature, seed=seed)
    texts = [mix.text(r) for r in out]
    leads = [lead_pole(s["target"]) for s in sits]
    scored = situation_scores([s["text"] for s in sits for _ in range(k)], texts,
                              [p for p in leads for _ in range(k)], encoder, classifiers)
    per = [scored[i * k:(i + 1) * k] for i in range(len(sits))]
    pairs = build_pairs(per, rc.pref_min_gap)
    report = {"situations": len(sits), "samples": len(texts),
              "degenerate": round(mean([s["degenerate"] for s in scored]), 4),
              "mean_score": round(mean([s["score"] for s in scored]), 4), "pairs": len(pairs)}

    def item(m, i):
        ids, ended = out[m * k + i]
        return Item(Sequence(prompts[m], ids + ([mix.enc.end] if ended else []),
                             f"routed-pref:{sits[m].get('id', m)}:{i}"))
    chosen = [(item(m, w), m) for m, w, _ in pairs]
    rejected = [(item(m, l), m) for m, _, l in pairs]
    if pairs:
        report["chosen_score"] = round(mean([per[m][w]["score"] for m, w, _ in pairs]), 4)
        report["rejected_score"] = round(mean([per[m][l]["score"] for m, _, l in pairs]), 4)
    return chosen, rejected, report


def _dpo(mix: Mixture, params, chosen, rejected, gates, kl_pool, rc, seed: int, progress
         ) -> tuple[list[dict], float]:
    """Step 4; returns (the log, the mean implicit reward margin after)."""
    w_items, w_rows = [it for it, _ in chosen], [m for _, m in chosen]
    l_items = [it for it, _ in rejected]
    g = gates[torch.tensor(w_rows)]                      # a pair's two replies share its gates
    with torch.no_grad():
        ref_w, ref_l = mix.log_likelihood(w_items, g), mix.log_likelihood(l_items, g)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=rc.pref_lr, weight_decay=0.0)
    log = []
    for step in range(rc.route_pref_steps):
        pick = rng.sample(range(len(w_items)), min(rc.pairs, len(w_items)))
        gp = g[torch.tensor(pick)]
        lp = mix.log_likelihood([w_items[i] for i in pick] + [l_items[i] for i in pick],
                                torch.cat([gp, gp]))
        n = len(pick)
        loss, margin = dpo_loss(lp[:n], lp[n:], ref_w[pick], ref_l[pick], rc.pref_beta)
        kl = torch.zeros((), device=lp.device)
        if rc.w_kl and kl_pool:
            batch = rng.sample(kl_pool, min(rc.distill, len(kl_pool)))
            kl = mix.kl_to_base([it for it, _ in batch], torch.stack([gr for _, gr in batch]))
        opt.zero_grad(set_to_none=True)
        (loss + rc.w_kl * kl).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.append({"step": step, "dpo": round(loss.item(), 5), "kl": round(kl.item(), 5),
                    "margin": round(float(margin.mean()), 5)})
        if progress is not None:
            progress.update(1)
    with torch.no_grad():
        after = ((mix.log_likelihood(w_items, g) - ref_w)
                 - (mix.log_likelihood(l_items, g) - ref_l))
    return log, float(after.mean())


def routed_preference_stage(trunk, pm, names: list[str], router, sits: list[dict],
                            feats: torch.Tensor, replies: list, enc, encoder, classifiers: dict,
                            rc, seed: int, progress=None) -> dict:
    """Steps 1-5 of the module doc on the experts of ``pm``; returns the stage's figures.

    sits: the router's train situations; feats [N, d]: their pooled features at the router's
    layer; replies[i]: the base model's kept reply to sits[i] (an experts.Item with base_top)
    or None; classifiers: {trait: the train split's TraitClassifier}."""
    with torch.no_grad():
        gates = router.gates(router.probabilities(feats.float())).float().cpu()     # [N, K]
    persona = [i for i, s in enumerate(sits) if lead_pole(s["target"])]
    val = [i for i in persona if rc.joint_val and i % rc.joint_val == 0]
    pool = [i for i in persona if i not in val]
    rng = random.Random(seed)
    train = sorted(rng.sample(pool, min(rc.route_pref_situations, len(pool))))
    pm.base_model.set_adapter(list(names))            # every expert active and trainable
    params = [p for n, p in pm.named_parameters() if "lora_" in n]
    mix = Mixture(trunk, pm, names, enc)
    held = HeldOut(mix, [sits[i] for i in val], gates[val], encoder, classifiers)
    before = held()
    chosen, rejected, report = _sample_pairs(mix, [sits[i] for i in train], gates[train],
                                             encoder, classifiers, rc, seed)
    report.update(steps=rc.route_pref_steps, validation=len(val), validation_before=before,
                  kept=False)
    if not chosen:
        pm.set_adapter(names[0])
        return report
    trunk.cache([it for it, _ in chosen + rejected])
    kl_pool = [(replies[i], gates[i]) for i in pool if replies[i] is not None]
    saved = [p.detach().clone() for p in params]
    log, margin = _dpo(mix, params, chosen, rejected, gates[train], kl_pool, rc, seed, progress)
    after = held()
    keep = after["score"] >= before["score"]
    if not keep:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
    pm.set_adapter(names[0])
    report.update(margin_after=round(margin, 5), validation_after=after, kept=keep, log=log)
    return report
