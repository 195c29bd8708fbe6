"""pf-train's joint stage (train/joint.py): the routed mixture under peft equals the engine's
persona mixture, and the stage trains the experts and the router together."""
import random

import numpy as np
import pytest
import torch

from pf_engine.train.experts import Item, Trunk, load_hf_model
from pf_engine.train.sequences import Sequence

POLES = ["openness+", "openness-", "extraversion+", "extraversion-"]


def _experts(folder, first: int = 1, seed: int = 0, scale: float = 0.3):
    """A peft model with one random adapter per pole (B random too, N(0, scale^2)), its trunk."""
    from peft import LoraConfig, get_peft_model
    hf = load_hf_model(folder)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                     layers_to_transform=[first], lora_dropout=0.0)
    names = [f"e{k}" for k in range(len(POLES))]
    torch.manual_seed(seed)
    pm = get_peft_model(hf, cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return pm, names, Trunk(hf, first)


def _items(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [Item(Sequence(rng.integers(3, 200, 5).tolist(), rng.integers(3, 200, 6).tolist()))
            for _ in range(n)]


def _pools(pm, trunk, n: int, seed: int):
    """Per pole n random texts and 4 random base replies, cached with their base figures."""
    items = {p: _items(n, seed=seed + k) for k, p in enumerate(POLES)}
    distill = _items(4, seed=seed + 10)
    every = [it for v in items.values() for it in v] + distill
    with pm.disable_adapter(), torch.no_grad():
        trunk.cache(every)
        for it, lp in zip(every, trunk.log_likelihood(every).tolist()):
            it.base_lp = lp
        trunk.cache_base_top(distill)
    return items, distill


def test_routed_mixture_equals_the_engines_persona_mix(tiny_chat_model, tmp_path):
    """Rows routed differently in one batch: peft with per-row scalings gives the log-likelihoods
    the engine gives for the same persona weights over a bank imported from those adapters."""
    from pf_engine import Engine
    from pf_engine.model.config import ModelConfig
    from pf_engine.persona.bank import AdapterBank
    from pf_engine.train.evaluate import score
    from pf_engine.train.joint import routed
    folder = tiny_chat_model[0]
    pm, names, trunk = _experts(folder)
    dirs = {}
    for n, pole in zip(names, POLES):
        pm.save_pretrained(str(tmp_path), selected_adapters=[n])
        dirs[pole] = str(tmp_path / n)
    bank = AdapterBank.from_peft(ModelConfig.from_file(f"{folder}/config.json"), dirs)
    eng = Engine.from_pretrained(folder, adapters=bank, device="cpu", dtype="fp32",
                                 progress=False)
    items = _items(3, seed=2)
    with pm.disable_adapter():
        trunk.cache(items)
    gates = torch.tensor([[0.5, 0.0, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [0.1, 0.7, 0.0, 0.3]])
    with torch.no_grad(), routed(pm, names, gates):
        got = trunk.log_likelihood(items)
    personas = [{p: float(w) for p, w in zip(POLES, row) if w} or None for row in gates]
    want = torch.tensor([s / n for s, n in score(eng, [it.seq for it in items], personas)])
    torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    with torch.no_grad():                     # scalings restored: one adapter at 1.0 again
        pm.set_adapter(names[2])
        alone = trunk.log_likelihood(items[:1])
    solo = score(eng, [items[0].seq], [{POLES[2]: 1.0}])[0]
    assert float(alone) == pytest.approx(solo[0] / solo[1], abs=2e-5)


def _stage(tiny_chat_model, steps: int, **kw):
    from pf_engine.persona.router import SequenceRouter
    from pf_engine.train.joint import Example, joint_stage
    from pf_engine.train.recipe import Recipe
    pm, names, trunk = _experts(tiny_chat_model[0], seed=3)
    items, distill = _pools(pm, trunk, 3, seed=10)
    d = trunk.model.config.hidden_size
    router = SequenceRouter.random(len(POLES), d, router_hidden=8, top_k=2, none=True, seed=4)
    g = torch.Generator().manual_seed(5)
    examples = []
    for i in range(12):
        t = torch.zeros(len(POLES) + 1)
        if i % 3 == 2:
            t[-1] = 1.0
        else:
            t[i % len(POLES)], t[-1] = 0.75, 0.25
        examples.append(Example(torch.randn(d, generator=g), t, distill[i % 4] if i % 2 else None))
    rc = Recipe(joint_steps=steps, joint_batch=4, joint_lr=1e-2, joint_router_lr=1e-2,
                joint_val=kw.pop("val", 3), **kw)
    lora = [p for n, p in pm.named_parameters() if "lora_" in n]
    start = [p.detach().clone() for p in lora]
    out, rep = joint_stage(trunk, pm, names, router, examples, items, POLES, distill, rc, seed=0)
    return router, out, rep, lora, start, pm, names


def test_joint_steps_lower_the_held_out_loss_and_train_both(tiny_chat_model):
    """Eight steps: the held-out joint loss falls, so the stage is kept; every expert and the
    router moved; the first adapter is the active one again afterwards."""
    router, out, rep, lora, start, pm, names = _stage(tiny_chat_model, 8)
    assert rep["kept"] and len(rep["log"]) == 8
    assert rep["validation_after"]["loss"] < rep["validation_before"]["loss"]
    for n in names:                                  # each expert's parameters changed
        moved = [not torch.equal(p, s) for (pn, p), s in
                 zip([(pn, p) for pn, p in pm.named_parameters() if "lora_" in pn], start)
                 if f".{n}." in pn]
        assert moved and all(moved), n
    assert out is not router and not torch.equal(out.w2, router.w2)
    assert out.layer == router.layer and out.strength == router.strength and out.top_k == 2
    assert pm.active_adapters == [names[0]]


def test_joint_stage_reverts_when_the_held_out_loss_rises(tiny_chat_model, monkeypatch):
    """A held-out score that rises: the experts return to their state before, the router given
    is the router returned."""
    from pf_engine.train import joint
    scores = iter([{"loss": 1.0}, {"loss": 2.0}])
    monkeypatch.setattr(joint, "_score", lambda loss, val: next(scores))
    router, out, rep, lora, start, _, _ = _stage(tiny_chat_model, 3)
    assert rep["kept"] is False and out is router
    assert all(torch.equal(p, s) for p, s in zip(lora, start))


def test_called_poles_by_weight_or_all():
    from pf_engine.train.joint import JointLoss
    t = torch.tensor([0.0, 0.6, 0.0, 0.4])
    assert JointLoss._called(t, None) == [(1, pytest.approx(0.6)), (3, pytest.approx(0.4))]
    rng = random.Random(0)
    drawn = [JointLoss._called(t, rng)[0][0] for _ in range(400)]
    assert set(drawn) == {1, 3} and 0.5 < drawn.count(1) / 400 < 0.7
    assert JointLoss._called(torch.zeros(4), rng) == []


def test_the_mixture_terms_reach_the_router(tiny_chat_model):
    """The pairwise and KL terms alone (no routing KL) give the router's weights a gradient:
    the router learns from what its gates do to the replies, not only from the targets."""
    from pf_engine.persona.router import SequenceRouter
    from pf_engine.train.joint import Example, JointLoss
    from pf_engine.train.recipe import Recipe
    pm, names, trunk = _experts(tiny_chat_model[0], seed=6)
    items, distill = _pools(pm, trunk, 2, seed=30)
    pm.base_model.set_adapter(names)
    d = trunk.model.config.hidden_size
    router = SequenceRouter.random(len(POLES), d, router_hidden=8, top_k=2, none=True, seed=7)
    loss = JointLoss(trunk, pm, names, router, items, POLES, distill, Recipe())
    g = torch.Generator().manual_seed(8)
    t = torch.tensor([0.45, 0.0, 0.3, 0.0, 0.25])
    parts = loss([Example(torch.randn(d, generator=g), t, distill[0])] * 2)
    (parts["pair"] + parts["kl"]).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loss.router_params)


def test_checkpointing_recomputes_the_routed_mixture(tiny_chat_model):
    """The cuda recipe's gradient checkpointing (on there by default): the joint loss's
    gradients, experts' and router's, as without it.  The per-row scalings are set within a
    block that has ended when backward recomputes the layers (before the fix: an error)."""
    from pf_engine.persona.router import SequenceRouter
    from pf_engine.train.joint import Example, JointLoss
    from pf_engine.train.recipe import Recipe
    pm, names, trunk = _experts(tiny_chat_model[0], seed=6)
    items, distill = _pools(pm, trunk, 2, seed=30)
    pm.base_model.set_adapter(names)
    d = trunk.model.config.hidden_size
    router = SequenceRouter.random(len(POLES), d, router_hidden=8, top_k=2, none=True, seed=7)
    g = torch.Generator().manual_seed(8)
    batch = [Example(torch.randn(d, generator=g), torch.tensor(t), distill[i])
             for i, t in enumerate([[0.45, 0.0, 0.3, 0.0, 0.25], [0.0, 0.75, 0.0, 0.0, 0.25]])]
    lora = [p for n, p in pm.named_parameters() if "lora_" in n]
    grads = []
    for checkpointing in (False, True):
        trunk.checkpointing = checkpointing
        for p in lora:
            p.grad = None
        loss = JointLoss(trunk, pm, names, router, items, POLES, distill, Recipe())
        loss(batch)["loss"].backward()
        grads.append([p.grad.clone() for p in lora] + [p.grad.clone() for p in loss.router_params])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
    assert sum(float(a.abs().sum()) for a in grads[0]) > 0
