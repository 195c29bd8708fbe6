"""pf-train's preference stage: on-policy DPO for one expert, after its supervised training.

Why DPO on the expert's own samples: the failure to fix is the expert's own behaviour under the
served weights (loops, "I'm sorry, I'm sorry"), so the pairs come from the expert itself
(on-policy, as in online DPO); DPO needs no reward model and no value head, and one sampling pass
plus a few dozen steps fits the CPU budget (GRPO would sample a group per prompt at every step).

For the expert of pole p, on training messages m (never the validation ones):

  1. sample k replies y_1..y_k per m from the expert (temperature ``pref_temperature``);
  2. score each with the early-stopping score (select.reply_scores: relevance to m by the
     independent encoder, minus 2 if degenerate, plus W_TRAIT times p's trait probability);
  3. pair per message: chosen = the best non-degenerate reply, rejected = the worst degenerate
     one if any (always kept), else the worst, kept when the score gap is >= ``pref_min_gap``;
  4. train with, on per-token mean log-likelihoods lp (Trunk) and the supervised expert frozen as
     the reference (lp_ref, computed once):

        L = -log sigmoid(beta * ((lp(y_w) - lp_ref(y_w)) - (lp(y_l) - lp_ref(y_l))))
          + w_kl * KL(base || expert) on the base model's own replies (experts.py's KL term)
          + w_safety * NLL(refusals of harmful requests)        (experts.py's safety terms)
          + w_safety_pair * contrast(refusal | harmful vs its look-alike)

     (per-token means: beta = 4 on a ~40-token reply is DPO's usual 0.1 on summed log-probs);
  5. keep the result only if the validation score (select.Validator) did not fall.

Metrics (bank.recipe["preference"][pole]): samples, their degenerate share and mean score, pairs
kept, the chosen/rejected mean scores, the implicit reward margin before and after, the
validation score before and after, whether the stage was kept.
"""
from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from pf_engine.train.experts import Item, kl_items, safety_terms
from pf_engine.train.select import generate, reply_scores
from pf_engine.train.sequences import Sequence


def build_pairs(scored: list[list[dict]], min_gap: float) -> list[tuple[int, int, int]]:
    """(message, chosen, rejected) sample indices from per-message lists of reply_scores."""
    pairs = []
    for m, rows in enumerate(scored):
        ok = [i for i, r in enumerate(rows) if not r["degenerate"]]
        if not ok:
            continue
        w = max(ok, key=lambda i: rows[i]["score"])
        bad = [i for i, r in enumerate(rows) if r["degenerate"]]
        l = min(bad or range(len(rows)), key=lambda i: rows[i]["score"])
        if bad or (l != w and rows[w]["score"] - rows[l]["score"] >= min_gap):
            pairs.append((m, w, l))
    return pairs


def dpo_loss(lp_w, lp_l, ref_w, ref_l, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean DPO loss, the implicit reward margins [B]) from per-sequence log-likelihoods."""
    margin = (lp_w - ref_w) - (lp_l - ref_l)
    return -F.logsigmoid(beta * margin).mean(), margin.detach()


def _train(trunk, params, chosen, rejected, distill, raw, rc,
           seed: int, safety: tuple = ((), ())) -> tuple[list[dict], float, float]:
    """The DPO steps; returns (log, mean margin before, mean margin after)."""
    with torch.no_grad():
        ref_w, ref_l = trunk.log_likelihood(chosen), trunk.log_likelihood(rejected)
    rng = random.Random(seed)
    opt = torch.optim.AdamW(params, lr=rc.pref_lr, weight_decay=0.0)
    log = []
    for step in range(rc.pref_steps):
        pick = rng.sample(range(len(chosen)), min(rc.pairs, len(chosen)))
        lp = trunk.log_likelihood([chosen[i] for i in pick] + [rejected[i] for i in pick])
        n = len(pick)
        loss, margin = dpo_loss(lp[:n], lp[n:], ref_w[pick], ref_l[pick], rc.pref_beta)
        kl = torch.zeros((), device=lp.device)
        kl_batch = kl_items(rng, distill, raw, rc) if rc.w_kl else []
        if kl_batch:
            kl = trunk.kl_to_base(kl_batch, rc.kl_first)
        safe, contrast = safety_terms(trunk, rng, *safety, rc)
        opt.zero_grad(set_to_none=True)
        (loss + rc.w_kl * kl + rc.w_safety * safe + rc.w_safety_pair * contrast).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.append({"step": step, "dpo": round(loss.item(), 5), "kl": round(kl.item(), 5),
                    "safety": round(safe.item(), 5), "safety_pair": round(contrast.item(), 5),
                    "margin": round(float(margin.mean()), 5)})
    with torch.no_grad():
        after = (trunk.log_likelihood(chosen) - ref_w) - (trunk.log_likelihood(rejected) - ref_l)
    return log, 0.0, float(after.mean())


def preference_stage(trunk, params, enc, messages: list[str], encoder, classifier, pole: str,
                     distill: list[Item], rc, seed: int, select=None,
                     before: dict | None = None, raw: list[Item] = (),
                     safety: tuple = ((), ())) -> dict:
    """Steps 1-5 of the module doc for the active adapter of ``trunk.model``; returns the metrics.
    select: the validation scorer (None: the stage is always kept); before: its figures for the
    adapter as it stands, when known (early stopping's), else computed.  raw: the raw
    continuations the KL term takes; safety: (the refusals, their look-alike twins) the safety
    terms take (experts.Pools)."""
    prompts = [enc.prompt(m) for m in messages]
    out = generate(trunk.model, prompts, enc.end, rc.pref_tokens, samples=rc.pref_samples,
                   temperature=rc.pref_temperature, seed=seed)
    k = rc.pref_samples
    texts = [enc.hf.decode(r, skip_special_tokens=True).strip() for r, _ in out]
    scored = reply_scores([m for m in messages for _ in range(k)], texts, encoder, classifier, pole)
    per_msg = [scored[i * k:(i + 1) * k] for i in range(len(messages))]
    pairs = build_pairs(per_msg, rc.pref_min_gap)
    report = {"samples": len(texts),
              "degenerate": round(sum(s["degenerate"] for s in scored) / len(scored), 4),
              "mean_score": round(sum(s["score"] for s in scored) / len(scored), 4),
              "pairs": len(pairs),
              "kept": False}
    if not pairs:
        return report

    def item(m, i):
        ids, ended = out[m * k + i]
        return Item(Sequence(prompts[m], ids + ([enc.end] if ended else []),
                             f"pref:{pole}:{m}:{i}"))
    chosen = [item(m, w) for m, w, _ in pairs]
    rejected = [item(m, l) for m, _, l in pairs]
    trunk.cache(chosen + rejected)
    report["chosen_score"] = round(sum(per_msg[m][w]["score"] for m, w, _ in pairs) / len(pairs), 4)
    report["rejected_score"] = round(
        sum(per_msg[m][l]["score"] for m, _, l in pairs) / len(pairs), 4)
    if select is not None and before is None:
        before = select()
    saved = [p.detach().clone() for p in params]
    log, m0, m1 = _train(trunk, params, chosen, rejected, distill, list(raw), rc, seed, safety)
    after = select() if select is not None else None
    keep = before is None or after["score"] >= before["score"]
    if not keep:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)
    report.update(margin_before=m0, margin_after=round(m1, 5), kept=keep, log=log,
                  validation_before=before, validation_after=after)
    return report
