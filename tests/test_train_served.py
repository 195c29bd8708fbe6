"""pf-train against the served weights (train/served.py): a transformers model made to compute what
the engine serves (quantized weights, 8-bit activations), and training on it."""
import numpy as np
import pytest
import torch

from pf_engine.train.served import round8, serve_like, served_weights

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _hf(folder):
    from pf_engine.train.experts import load_hf_model
    return load_hf_model(folder)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def test_round8_matches_the_kernels_reference():
    from pf_kernels.quant import quantize_x_reference
    x = torch.randn(3, 5, 96, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 0, :32] = 0.0                                   # an all-zero block stays zero
    x[1, 2, 40] = 1e-4                                   # tiny values round to zero or d
    want = torch.from_numpy(quantize_x_reference(x.numpy())).float()
    assert torch.equal(round8(x), want)
    assert not torch.equal(round8(x), x)


def test_straight_through_gradient():
    from pf_engine.train.served import _round_input
    x = torch.randn(2, 64, requires_grad=True)
    (y,) = _round_input(None, (x,))
    assert torch.equal(y.detach(), round8(x.detach()))
    (y * torch.arange(64.0)).sum().backward()
    assert torch.equal(x.grad, torch.arange(64.0).expand(2, 64))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from gguf_fixtures import write_tiny_gguf
    path = tmp_path_factory.mktemp("served") / "tiny-q4_1.gguf"
    write_tiny_gguf(path, qtype="Q4_1", tied=True, seed=5)
    return str(path)


def _engine_logits(model, quantize, ids):
    from pf_engine import Engine
    eng = Engine.from_pretrained(model, progress=False, device="cpu", dtype="fp32", quantize=quantize,
                                 backend="cpu")
    return eng, eng.logits([ids])[0]


@pytest.mark.parametrize("source", ["gguf", "folder-q8", "folder-q4"])
def test_serve_like_computes_what_the_engine_serves(source, tiny_gguf, tiny_chat_model):
    """transformers + serve_like gives the cpu engine's logits to float rounding; without the
    activation rounding (or without the served weights) it is far off."""
    from pf_kernels import cpu_ops
    if not cpu_ops.cpu_available()[0]:
        pytest.skip("csrc/cpu is not built")
    model, quantize = {"gguf": (tiny_gguf, None), "folder-q8": (tiny_chat_model[0], "q8"),
                       "folder-q4": (tiny_chat_model[0], "q4")}[source]
    folder, cfg, weights = served_weights(model, quantize)
    ids = list(np.random.default_rng(3).integers(3, 200, 13))
    eng, want = _engine_logits(model, quantize, ids)
    x = torch.tensor([ids])
    plain = _hf(folder)
    hooked = _hf(folder)
    info = serve_like(hooked, cfg, weights)
    assert len(info["rounded"]) == 7 * cfg.num_hidden_layers + 1          # projections + head
    with torch.no_grad():
        got = hooked(input_ids=x).logits[0]
        unrounded = _hf(folder)
        serve_like(unrounded, cfg, weights, round_activations=False)
        far = unrounded(input_ids=x).logits[0]
        base = plain(input_ids=x).logits[0]
    err = _rel(got, want)
    assert err < 1e-5, err
    assert _rel(far, want) > 20 * err                     # the rounding is what closes the gap
    if source != "gguf":                                  # a folder's float weights, quantized
        assert _rel(base, want) > 20 * err
    for h in info["handles"]:
        h.remove()
    with torch.no_grad():
        assert _rel(hooked(input_ids=x).logits[0], far) < 1e-5


def test_training_on_the_quantized_base_equals_its_dequantized_copy(tiny_chat_model, tmp_path):
    """Without activation rounding, a served q4 base is its dequantized copy: an expert trained on
    either is the same to float rounding (1e-6); with rounding, training moves differently."""
    from peft import LoraConfig, get_peft_model

    from pf_engine.train.experts import Item, Pools, Trunk, train_expert
    from pf_engine.train.recipe import Recipe
    from pf_engine.train.sequences import Sequence
    folder, cfg, weights = served_weights(tiny_chat_model[0], "q4")
    copy = tmp_path / "dequantized"
    m = _hf(folder)
    serve_like(m, cfg, weights, round_activations=False)
    m.save_pretrained(copy)
    import shutil
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{folder}/{f}", copy / f)
    rng = np.random.default_rng(0)
    seqs = [Sequence(rng.integers(3, 200, 6).tolist(), rng.integers(3, 200, 5).tolist()) for _ in range(8)]

    def train(model_dir, q, rounding):
        f, c, w = served_weights(model_dir, q)
        hf = _hf(f)
        serve_like(hf, c, w, round_activations=rounding)
        torch.manual_seed(0)
        pm = get_peft_model(hf, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                           layers_to_transform=[1], lora_dropout=0.0))
        trunk = Trunk(hf, 1)
        items = [Item(s) for s in seqs]
        with pm.disable_adapter():
            trunk.cache(items)
            with torch.no_grad():
                for it, lp in zip(items, trunk.log_likelihood(items).tolist()):
                    it.base_lp = lp
        rc = Recipe(steps=3, pairs=2, retain=2, w_kl=0.0)
        params = [p for p in pm.parameters() if p.requires_grad]
        train_expert(trunk, params, Pools(items[:4], items[4:], items[4:], []), rc, seed=0)
        return torch.cat([p.detach().flatten() for p in params])

    a = train(tiny_chat_model[0], "q4", False)
    b = train(str(copy), None, False)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    c = train(tiny_chat_model[0], "q4", True)
    assert (c - a).abs().max() > 1e-4


# The preference stage (train/preference.py) -------------------------------------------------------
def test_build_pairs_rejects_a_degenerate_reply_and_needs_a_gap():
    from pf_engine.train.preference import build_pairs

    def r(s, d=0.0):
        return {"score": s, "degenerate": d}
    scored = [[r(0.5), r(0.9), r(0.95, 1.0), r(0.1)],     # the looping one is rejected, though
              [r(0.5), r(0.52)],                          # scored above the worst; gap too small
              [r(-1.0, 1.0), r(-1.5, 1.0)],               # nothing fluent to choose
              [r(0.2), r(0.7)]]
    assert build_pairs(scored, 0.05) == [(0, 1, 2), (3, 1, 0)]


def test_dpo_loss_matches_its_formula():
    from pf_engine.train.preference import dpo_loss
    lw, ll, rw, rl = (torch.tensor(v) for v in ([-1.0, -2.0], [-1.5, -1.0], [-1.2, -2.0], [-1.4, -1.1]))
    loss, margin = dpo_loss(lw, ll, rw, rl, beta=4.0)
    m = [(-1.0 + 1.2) - (-1.5 + 1.4), (-2.0 + 2.0) - (-1.0 + 1.1)]
    assert torch.allclose(margin, torch.tensor(m))
    want = sum(-np.log(1 / (1 + np.exp(-4.0 * x))) for x in m) / 2
    assert float(loss) == pytest.approx(want, rel=1e-6)


def _tiny_trunk(folder):
    from peft import LoraConfig, get_peft_model

    from pf_engine.train.experts import Trunk
    hf = _hf(folder)
    torch.manual_seed(0)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                       layers_to_transform=[1], lora_dropout=0.0))
    return pm, Trunk(hf, 1)


@pytest.mark.parametrize("steps", [0, 6])
def test_preference_steps_raise_the_chosen_over_rejected_margin(tiny_chat_model, steps):
    """DPO against the frozen start: the implicit reward margin of chosen over rejected replies
    grows from 0 (and stays 0 without steps)."""
    from pf_engine.train.experts import Item
    from pf_engine.train.preference import _train
    from pf_engine.train.recipe import Recipe
    from pf_engine.train.sequences import Sequence
    pm, trunk = _tiny_trunk(tiny_chat_model[0])
    rng = np.random.default_rng(1)
    chosen, rejected = [], []
    for _ in range(4):
        prompt = rng.integers(3, 200, 5).tolist()
        chosen.append(Item(Sequence(prompt, rng.integers(3, 200, 6).tolist())))
        rejected.append(Item(Sequence(prompt, [7, 8, 7, 8, 7, 8])))
    trunk.cache(chosen + rejected)
    rc = Recipe(pref_steps=steps, pref_lr=1e-2, pairs=4, w_kl=0.0)
    params = [p for p in pm.parameters() if p.requires_grad]
    log, before, after = _train(trunk, params, chosen, rejected, [], [], rc, seed=0)
    assert before == 0.0 and len(log) == steps
    if steps:
        assert after > 0.05 and log[-1]["dpo"] < log[0]["dpo"]
    else:
        assert after == 0.0


def test_preference_stage_samples_scores_and_keeps_or_reverts(tiny_chat_model):
    """The whole stage on a tiny model with a scorer that calls the first sample of each message
    the best: pairs form, the metrics are reported, and a validation score that falls reverts
    the adapter to its state before the stage."""
    from pf_engine.train.preference import preference_stage
    from pf_engine.train.recipe import Recipe
    from pf_engine.train.sequences import ChatEncoder
    from pf_engine.tokenizer import Tokenizer
    pm, trunk = _tiny_trunk(tiny_chat_model[0])
    enc = ChatEncoder(Tokenizer(tiny_chat_model[0]).hf)

    class Encoder:
        def relevance(self, messages, texts):
            return [1.0 if i % 2 == 0 else 0.0 for i in range(len(texts))]

    class Classifier:
        def prob(self, texts):
            return [0.5] * len(texts)
    rc = Recipe(pref_steps=3, pref_samples=2, pref_tokens=6, pref_lr=1e-2, pairs=2, w_kl=0.0)
    params = [p for p in pm.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    scores = iter([{"score": 1.0}, {"score": 0.5}])           # validation: falls -> revert
    rep = preference_stage(trunk, params, enc, ["hello there", "how are you"], Encoder(), Classifier(),
                           "openness+", [], rc, seed=0, select=lambda: next(scores))
    assert rep["samples"] == 4
    assert rep["pairs"] >= 1 and rep["chosen_score"] > rep["rejected_score"]     # seeded sampling
    assert rep["kept"] is False and len(rep["log"]) == 3 and rep["margin_after"] > 0
    assert all(torch.equal(p, s) for p, s in zip(params, start))


def test_bad_pref_steps_is_one_line_before_any_loading(tmp_path, capsys):
    from pf_engine.cli.train import main
    assert main(["-o", str(tmp_path / "b.safetensors"), "--pref-steps", "-1", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "pf-train: error: --pref-steps must be >= 0, got -1"
    assert not (tmp_path / "b.safetensors").exists()
