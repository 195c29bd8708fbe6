"""Training the sequence router (``persona="auto"``) from situations to target persona mixes.

Features are what the engine's router reads at inference: the mean over the prompt's tokens of
the base model's hidden state after layer l, for the chat-formatted situation (router.py).  The
router is the engine's MLP, trained full-batch on the train split:

    p = softmax(W2 silu(W1 x + b1) + b2)                     x standardised: folded into W1, b1
    L = mean_i KL(target_i || p_i)  +  w_balance * KL(normalise(mean_i p_i[:K]) || uniform)

With ``none`` the router has K + 1 outputs, the last one "no persona is called for": targets
are [N, K+1], a situation that calls for no trait has target (0, ..., 0, 1), and one that calls
for a mix m gets (strength * m, 1 - strength) (recipe.Recipe.persona_strength), so ``auto``
mixes its experts in at that strength and leaves the rest to the base model.
The balance term keeps every expert in use without fighting the targets (it acts on the batch
mean of the expert outputs).

Fitted on all of the train split, the router reproduces the target strength there almost
exactly, but on unseen prompts its persona probability q = 1 - p_none spreads far below it.  So
with ``strength_scale`` S the total weight is calibrated on the cross-validation folds' held-out
predictions (``fit_strength``): a logistic curve in logit(q),

    strength = S * sigmoid(a * (logit(q) - c)),   (a, c) = argmin BCE(persona row?) + LAMBDA a^2

so a prompt the router places on the persona side gets about S and one on the none side about 0.
The layer l is chosen by k-fold cross-validation on the train
split alone (top-2 hit rate on persona situations plus, with none, the share of no-persona
situations whose total persona weight is <= NONE_MAX; then KL), never on held-out data.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pf_engine.persona.router import LOGIT_EPS, SequenceRouter, total_weight
from pf_engine.train.data import NONE

NONE_MAX = 0.2          # a no-persona situation is routed right when its strength is at most this
LAMBDA = 1e-2           # the calibration's penalty on its slope (classes that separate: finite)


@torch.inference_mode()
def pooled_states(model, prompts: list[list[int]], progress=None) -> torch.Tensor:
    """Mean-pooled hidden states [N, L+1, d] (fp32) of each prompt after every layer."""
    cfg = model.cfg
    out = []
    for ids in prompts:
        tokens = torch.tensor([ids], device=model.device)
        states = model.layer_states(tokens, cfg.num_hidden_layers)
        out.append(torch.stack([h[0].float().mean(0) for h in states]).cpu())
        if progress is not None:
            progress.update(1)
    return torch.stack(out)


def target_kl(targets: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """mean_i KL(targets_i || p_i) from targets [N, K] (rows sum to 1, zeros allowed) and the
    router's log-probabilities logp [N, K]."""
    log_t = torch.where(targets > 0, targets.clamp_min(1e-12).log(), torch.zeros(()))
    return (targets * (log_t - logp)).sum(1).mean()


def top2_hits(gates: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per row: does one of the two largest gates fall on an expert the target uses? [N] bool."""
    top = gates.topk(min(2, gates.shape[1]), dim=1).indices
    return (targets.gather(1, top) > 0).any(1)


def _fit(x: torch.Tensor, targets: torch.Tensor, hidden: int, steps: int, lr: float,
         weight_decay: float, w_balance: float, seed: int, none: bool = False):
    """Train the MLP on standardised features; returns (w1, b1, w2, b2) in the raw feature space."""
    g = torch.Generator().manual_seed(seed)
    N, d = x.shape
    K = targets.shape[1]
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-4)
    z = (x - mu) / sd
    w1 = (torch.randn(hidden, d, generator=g) / math.sqrt(d)).requires_grad_()
    b1 = torch.zeros(hidden, requires_grad=True)
    w2 = (torch.randn(K, hidden, generator=g) / math.sqrt(hidden)).requires_grad_()
    b2 = torch.zeros(K, requires_grad=True)
    opt = torch.optim.AdamW([w1, b1, w2, b2], lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        logp = F.log_softmax(F.linear(F.silu(F.linear(z, w1, b1)), w2, b2), -1)
        kl = target_kl(targets, logp)
        E = K - none
        mean_p = logp.exp()[:, :E].mean(0)
        mean_p = mean_p / mean_p.sum()
        balance = (mean_p * (mean_p * E).clamp_min(1e-12).log()).sum()
        loss = kl + w_balance * balance
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        w1f = w1 / sd
        b1f = b1 - w1f @ mu
    return w1f.detach(), b1f.detach(), w2.detach(), b2.detach()


def fit_strength(q: torch.Tensor, persona: torch.Tensor, scale: float, steps: int = 200) -> dict:
    """The strength calibration {scale, slope, centre} from persona probabilities q [N] the
    router gave rows it did not train on, and whether each row calls for a persona [N] bool."""
    x = torch.logit(q.double(), eps=LOGIT_EPS)
    y = persona.double()
    log_a = torch.zeros((), dtype=torch.float64, requires_grad=True)
    c = ((x[persona].mean() + x[~persona].mean()) / 2).detach().clone().requires_grad_()
    opt = torch.optim.LBFGS([log_a, c], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        a = log_a.exp()
        loss = F.binary_cross_entropy_with_logits(a * (x - c), y) + LAMBDA * a * a
        loss.backward()
        return loss
    opt.step(closure)
    return {"scale": float(scale), "slope": log_a.exp().item(), "centre": c.item()}


def _score(router: SequenceRouter, x: torch.Tensor, targets: torch.Tensor) -> dict:
    """On pooled features x: top-2 hit rate on persona rows, the share of no-persona rows routed
    to strength <= NONE_MAX (with none), mean KL(target || router softmax before top-k)."""
    K = router.num_experts
    with torch.no_grad():
        p = router.probabilities(x)
        kl = target_kl(targets, p.clamp_min(1e-12).log())
        persona = targets[:, :K].sum(1) > 0
        out = {"top2_hit": float(top2_hits(p[persona, :K], targets[persona, :K]).float().mean())
               if persona.any() else float("nan"), "kl": float(kl)}
        if router.none and (~persona).any():
            out["none_hit"] = float((router.gates(p[~persona]).sum(1) <= NONE_MAX).float().mean())
    return out


def train_router(features: torch.Tensor, targets: torch.Tensor, layers: list[int],
                 hidden: int = 64, steps: int = 300, lr: float = 1e-2, weight_decay: float = 1e-2,
                 w_balance: float = 0.05, top_k: int = 2, folds: int = 4, seed: int = 0,
                 none: bool = False, strength_scale: float | None = None):
    """Choose the layer by k-fold CV, then fit on all of the train split.

    features [N, L+1, d] (``pooled_states``), targets [N, K] or, with ``none``, [N, K+1] (rows
    sum to 1).  strength_scale (with none): calibrate the strength on the chosen layer's
    held-out fold predictions (``fit_strength``).  Returns (SequenceRouter, report) where report
    holds each candidate layer's CV figures (and the calibration's, on the same folds).
    """
    N = features.shape[0]
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    fold_of = torch.empty(N, dtype=torch.long)
    fold_of[perm] = torch.arange(N) % folds
    cv, held_out = {}, {}
    for layer in layers:
        sums: dict[str, float] = {}
        held_out[layer] = torch.empty(N, targets.shape[1])
        for f in range(folds):
            tr, te = fold_of != f, fold_of == f
            w = _fit(features[tr, layer], targets[tr], hidden, steps, lr, weight_decay,
                     w_balance, seed, none)
            fold_router = SequenceRouter(*w, layer=layer, top_k=top_k, none=none)
            with torch.no_grad():
                held_out[layer][te] = fold_router.probabilities(features[te, layer])
            for k, v in _score(fold_router, features[te, layer], targets[te]).items():
                if v == v:                                 # a fold without such rows adds 0
                    sums[k] = sums.get(k, 0.0) + v / folds
        cv[layer] = sums
    best = min(layers, key=lambda l: (-round(cv[l].get("top2_hit", 0) + cv[l].get("none_hit", 0),
                                             6), cv[l]["kl"], l))
    report = {"layer": best, "cv": {str(l): v for l, v in cv.items()}}
    strength = None
    if none and strength_scale is not None:
        strength, report["calibration"] = _calibrate(held_out[best], targets, strength_scale)
    w = _fit(features[:, best], targets, hidden, steps, lr, weight_decay, w_balance, seed, none)
    router = SequenceRouter(*w, layer=best, top_k=top_k, none=none, strength=strength)
    return router, report


def _calibrate(p: torch.Tensor, targets: torch.Tensor, scale: float):
    """fit_strength on held-out fold probabilities p [N, K+1]; returns (strength, report): the
    cross-validated total weight of persona rows (quartiles) and none_hit, before and after."""
    persona = targets[:, :-1].sum(1) > 0
    strength = fit_strength(1 - p[:, -1], persona, scale)
    report = {"strength": strength}
    for name, s in (("uncalibrated", None), ("calibrated", strength)):
        total = total_weight(p[:, -1], s)
        qs = total[persona].quantile(torch.tensor([0.25, 0.5, 0.75])).tolist() \
            if persona.any() else []
        report[name] = {"persona_strength_quartiles": [round(v, 4) for v in qs],
                        "none_hit": float((total[~persona] <= NONE_MAX).float().mean())
                        if (~persona).any() else float("nan")}
    return strength, report


# pf-train's router data ----------------------------------------------------------------------
def none_situations(split) -> list[dict]:
    """The split's fact questions and neutral prompts as situations that call for no persona
    (more examples of the router's none output beside the no-persona situations)."""
    return ([{"id": f["id"], "category": "fact", "text": f["question"], "target": {NONE: 1.0}}
             for f in split.facts] +
            [{"id": f"neutral:{i}", "category": "neutral", "text": q, "target": {NONE: 1.0}}
             for i, (q, _) in enumerate(split.neutral)])


def router_targets(corpus, situations, recipe) -> torch.Tensor:
    """[N, K] target mixes, or with ``router_none`` [N, K+1]: a persona mix at
    ``persona_strength`` with the rest on none, and (0, ..., 0, 1) where none is called for."""
    K = len(corpus.poles)
    rows = []
    for s in situations:
        t = s["target"]
        mix = [t.get(p, 0.0) for p in corpus.poles]
        if not recipe.router_none:
            rows.append(mix)
            continue
        share = recipe.persona_strength * (1 - t.get(NONE, 0.0))
        total = sum(mix) or 1.0
        rows.append([share * w / total for w in mix] + [1 - share])
    return torch.tensor(rows).reshape(len(situations), K + recipe.router_none)


def router_data(corpus, enc, eng, recipe, progress: bool):
    """(situations, pooled features [N, L+1, d], targets [N, K(+1)]): the train situations and
    the none ones (none_situations), features from the served engine (what persona="auto"
    reads)."""
    from tqdm.auto import tqdm
    sits = corpus.train.situations + none_situations(corpus.train)
    if not recipe.router_none:       # a router without a none output cannot learn those
        sits = [s for s in sits if not s["target"].get(NONE)]
    if recipe.limit:                 # quick: the first two of each category
        by_cat: dict[str, list] = {}
        for s in sits:
            by_cat.setdefault(s["category"], []).append(s)
        sits = [s for group in by_cat.values() for s in group[:2]]
    prompts = [enc.prompt(s["text"]) for s in sits]
    targets = router_targets(corpus, sits, recipe)
    with tqdm(total=len(prompts), desc="router features", disable=not progress) as bar:
        feats = pooled_states(eng.model, prompts, progress=bar)
    return sits, feats, targets


def fit_router(feats, targets, recipe, num_layers: int):
    """The sequence router on the situations' pooled features (train/router.py)."""
    layers = [l for l in recipe.router_layers if l <= num_layers] or [num_layers]
    return train_router(feats, targets, layers, hidden=recipe.router_hidden,
                        steps=recipe.router_steps, w_balance=recipe.router_balance,
                        top_k=recipe.router_top_k, seed=recipe.seed, none=recipe.router_none,
                        strength_scale=recipe.persona_strength if recipe.router_calibrate
                        else None)
