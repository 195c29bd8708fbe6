"""pf-train's routed preference stage (train/routed_pref.py) and ``--from BANK``
(train/resume.py): auto's mixture generates and trains at each row's own gates, DPO on it raises
the chosen replies over the rejected ones, the stage keeps or reverts on its held-out score, and
a bank's experts go back into peft adapters exactly."""
import numpy as np
import pytest
import torch

from pf_engine.train.experts import Item
from pf_engine.train.sequences import Sequence

from test_train_joint import POLES


def _experts(folder, seed: int = 0):
    """A peft model with one random adapter per pole on layer 1, its trunk (the joint stage's
    test helper, with larger weights so the gates change greedy replies)."""
    from test_train_joint import _experts as joint_experts
    return joint_experts(folder, seed=seed, scale=0.5)


def _mixture(tiny_chat_model, seed: int = 0):
    from pf_engine.tokenizer import Tokenizer
    from pf_engine.train.routed_pref import Mixture
    from pf_engine.train.sequences import ChatEncoder
    pm, names, trunk = _experts(tiny_chat_model[0], seed)
    return Mixture(trunk, pm, names, ChatEncoder(Tokenizer(tiny_chat_model[0]).hf))


def test_lead_pole_is_the_largest_persona_weight():
    from pf_engine.train.data import lead_pole
    assert lead_pole({"openness+": 0.3, "extraversion-": 0.45, "none": 0.25}) == "extraversion-"
    assert lead_pole({"none": 1.0}) is None and lead_pole({"openness+": 0.0}) is None


def test_each_sampled_row_runs_at_its_own_prompts_gates(tiny_chat_model):
    """Two prompts at different gates, two near-greedy samples each (prompt-major): every row is
    its prompt's greedy reply at that prompt's gates; zero gates give the base model's reply."""
    mix = _mixture(tiny_chat_model)
    prompts = [mix.enc.prompt("tell me a story"), mix.enc.prompt("what is a cat")]
    g = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.9, 0.0, 0.6]])
    rows = mix.generate(prompts, g, 8, samples=2, temperature=1e-4, seed=0)
    alone = [mix.generate(prompts[i:i + 1], g[i:i + 1], 8)[0] for i in range(2)]
    assert rows == [alone[0], alone[0], alone[1], alone[1]]
    assert alone[0] == mix.base_generate(prompts[:1], 8)[0]
    other = mix.generate(prompts[1:], g[:1], 8)[0]           # the same prompt at zero gates
    assert other != alone[1]                                  # the gates change the reply


def _pairs(mix, n: int, seed: int):
    rng = np.random.default_rng(seed)
    chosen, rejected = [], []
    for m in range(n):
        prompt = rng.integers(3, 200, 5).tolist()
        chosen.append((Item(Sequence(prompt, rng.integers(3, 200, 6).tolist())), m))
        rejected.append((Item(Sequence(prompt, [7, 8, 7, 8, 7, 8])), m))
    mix.trunk.cache([it for it, _ in chosen + rejected])
    return chosen, rejected


@pytest.mark.parametrize("gates, grows", [([0.6, 0.0, 0.3, 0.0], True),
                                          ([0.0, 0.0, 0.0, 0.0], False)])
def test_routed_dpo_raises_the_margin_only_through_the_gates(tiny_chat_model, gates, grows):
    """DPO on the mixture against its start: the chosen-over-rejected margin grows from 0; at
    zero gates no expert reaches the output, so nothing trains and it stays 0."""
    from pf_engine.train.recipe import Recipe
    from pf_engine.train.routed_pref import _dpo
    mix = _mixture(tiny_chat_model, seed=2)
    chosen, rejected = _pairs(mix, 4, seed=1)
    mix.pm.base_model.set_adapter(mix.names)
    params = [p for n, p in mix.pm.named_parameters() if "lora_" in n]
    rc = Recipe(route_pref_steps=6, pref_lr=1e-2, pairs=4, w_kl=0.0)
    log, after = _dpo(mix, params, chosen, rejected, torch.tensor([gates] * 4), [], rc, 0, None)
    assert len(log) == 6
    if grows:
        assert after > 0.05 and log[-1]["dpo"] < log[0]["dpo"]
    else:
        assert after == 0.0


class _Encoder:
    def relevance(self, messages, texts):
        return [0.5] * len(texts)


class _Classifier:
    """P(trait+) rising with the reply's length, so the samples' scores differ."""

    def prob(self, texts):
        return [min(1.0, len(t) / 40) for t in texts]


def _stage(tiny_chat_model, monkeypatch, held: list[float], steps: int = 3):
    from pf_engine.persona.router import SequenceRouter
    from pf_engine.train import routed_pref
    from pf_engine.train.recipe import Recipe
    mix = _mixture(tiny_chat_model, seed=4)
    scores = iter(held)

    class Held:
        def __init__(self, *args):
            pass

        def __call__(self):
            return {"score": next(scores), "moved": 0.5, "degenerate": 0.0}
    monkeypatch.setattr(routed_pref, "HeldOut", Held)
    d = mix.trunk.model.config.hidden_size
    router = SequenceRouter.random(len(POLES), d, router_hidden=8, top_k=2, none=True, seed=4)
    sits = [{"id": f"s{i}", "text": t, "target": {POLES[i % 4]: 0.75, "none": 0.25}}
            for i, t in enumerate(["hi there", "a plan for today", "I lost my keys",
                                   "good news!", "help me write", "a quiet evening"])]
    feats = torch.randn(len(sits), d, generator=torch.Generator().manual_seed(6))
    rc = Recipe(route_pref_steps=steps, route_pref_situations=4, pref_samples=3, pref_tokens=8,
                pref_lr=1e-2, pairs=2, w_kl=0.0, joint_val=3)
    params = [p for n, p in mix.pm.named_parameters() if "lora_" in n]
    start = [p.detach().clone() for p in params]
    clfs = {"openness": _Classifier(), "extraversion": _Classifier()}
    rep = routed_pref.routed_preference_stage(mix.trunk, mix.pm, mix.names, router, sits, feats,
                                              [None] * len(sits), mix.enc, _Encoder(), clfs, rc,
                                              seed=0)
    return rep, params, start, mix


@pytest.mark.parametrize("held, kept", [([0.5, 0.6], True), ([0.6, 0.5], False)])
def test_routed_stage_samples_pairs_and_keeps_or_reverts(tiny_chat_model, monkeypatch, held,
                                                         kept):
    """The whole stage on a tiny model: 4 of the 4 train situations (2 of 6 held out) sampled 3
    times, pairs formed, the figures reported; a held-out score that falls restores every
    expert, one that rises keeps the trained ones; the first adapter is active afterwards."""
    rep, params, start, mix = _stage(tiny_chat_model, monkeypatch, held)
    assert rep["situations"] == 4 and rep["samples"] == 12 and rep["validation"] == 2
    assert rep["pairs"] >= 1 and rep["chosen_score"] > rep["rejected_score"]
    assert rep["kept"] is kept and len(rep["log"]) == 3
    same = all(torch.equal(p, s) for p, s in zip(params, start))
    assert same is not kept
    assert mix.pm.active_adapters == [mix.names[0]]


def test_bank_into_peft_restores_the_experts(tiny_chat_model, tmp_path):
    """peft adapters -> their PEFT folders -> a bank -> fresh adapters: the same weights; an
    adapter of another rank is refused in one line."""
    from pf_engine.errors import PFError
    from pf_engine.model.config import ModelConfig
    from pf_engine.persona.bank import AdapterBank
    from pf_engine.train.resume import bank_into_peft
    pm, names, _ = _experts(tiny_chat_model[0], seed=7)
    dirs = {}
    for n, pole in zip(names, POLES):
        pm.save_pretrained(str(tmp_path), selected_adapters=[n])
        dirs[pole] = str(tmp_path / n)
    bank = AdapterBank.from_peft(ModelConfig.from_file(f"{tiny_chat_model[0]}/config.json"), dirs,
                                 dtype=torch.float32)
    fresh, _, _ = _experts(tiny_chat_model[0], seed=8)
    want = {n: p.detach().clone() for n, p in pm.named_parameters() if "lora_" in n}
    got = dict(fresh.named_parameters())
    assert any(not torch.equal(got[n], w) for n, w in want.items())
    assert bank_into_peft(bank, fresh, names) == 3 * len(names)
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=0, atol=0)
    from peft import LoraConfig, get_peft_model

    from pf_engine.train.experts import load_hf_model
    other = get_peft_model(load_hf_model(tiny_chat_model[0]),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                      layers_to_transform=[1]), adapter_name="e0")
    with pytest.raises(PFError, match=r"^bank expert openness\+ has rank 4, scaling 2; the "
                                      r"adapter expects 2, 2$"):
        bank_into_peft(bank, other, ["e0"])


def test_from_needs_a_stage_and_a_pf_train_bank(tmp_path, tiny_chat_model, capsys):
    """--from without --route-pref-steps, or with a bank pf-train did not write: one line, no
    bank written, before any model loads."""
    from pf_engine.cli.train import main
    from pf_engine.model.config import ModelConfig
    from pf_engine.persona.bank import AdapterBank
    out = tmp_path / "b.safetensors"
    src = tmp_path / "random.safetensors"
    AdapterBank.random(ModelConfig.from_file(f"{tiny_chat_model[0]}/config.json"), rank=2,
                       router=True).save(src)
    assert main(["-o", str(out), "--from", str(src), "-q"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"pf-train: error: --from {src}: nothing to train after its stages (pass "
        "--route-pref-steps N)")
    assert main(["-o", str(out), "--from", str(src), "--route-pref-steps", "2", "-q"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"pf-train: error: --from {src}: the bank has no pf-train recipe in its metadata, so "
        "the shape of its adapters is unknown")
    assert main(["-o", str(out), "--from", str(tmp_path / "none"), "--route-pref-steps", "2",
                 "-q"]) == 2
    assert capsys.readouterr().err.strip().startswith(
        f"pf-train: error: no adapter bank at {tmp_path / 'none'} (expected a bank file")
    assert not out.exists()


def test_held_out_score_without_situations_is_zero(tiny_chat_model):
    """joint_val 0 keeps no situation out: the held-out score is 0 before and after, so the
    stage is kept, and nothing is generated for an empty list."""
    from pf_engine.train.routed_pref import HeldOut
    mix = _mixture(tiny_chat_model)
    held = HeldOut(mix, [], torch.zeros(0, len(POLES)), _Encoder(), {})
    assert held() == {"score": 0.0, "moved": 0.0, "degenerate": 0.0}
