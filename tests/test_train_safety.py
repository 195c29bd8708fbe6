"""pf-train's safety term: every expert learns the refusals of the train split's harmful requests
(data/personas/train/safety.jsonl) and the KL term holds the base model's answers to their
benign look-alikes; pf-eval's own requests (data/evals/safety.jsonl) stay out of training."""
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from pf_engine.errors import PFError
from pf_engine.train.data import default_data_dir, load_corpus
from pf_engine.train.distill import held_in_prompts
from pf_engine.train.experts import Item, Pools, Trunk, load_hf_model, train_expert
from pf_engine.train.data import safety_pairs, split_safety
from pf_engine.train.recipe import Recipe
from pf_engine.train.retention import default_evals_dir, read_jsonl, refused
from pf_engine.train.sequences import Sequence

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
DATA = default_data_dir()


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def test_shipped_safety_rows_refuse_and_stay_apart_from_the_evaluated_ones():
    rows = load_corpus(DATA, splits=("train",)).train.safety
    harmful = [r for r in rows if r["kind"] == "harmful"]
    benign = [r for r in rows if r["kind"] == "benign"]
    assert len(harmful) >= 40 and len(benign) >= 40
    assert all(refused(r["reply"]) for r in harmful)        # pf-eval's detector says refusal
    asked = [r["text"] for r in read_jsonl(os.path.join(default_evals_dir(), "safety.jsonl"))]
    for r in rows:
        w = _words(r["prompt"])
        closest = max(len(w & _words(q)) / len(w | _words(q)) for q in asked)
        assert closest <= 0.4, (r["prompt"], closest)
    split = load_corpus(DATA, splits=("train",)).train
    kinds = [k for k, _, _ in held_in_prompts(split, benign=True)]
    assert kinds.count("benign") == len(benign)              # the KL term holds their answers
    assert "benign" not in [k for k, _, _ in held_in_prompts(split)]     # only with the term


@pytest.fixture
def data_copy(tmp_path):
    dst = tmp_path / "personas"
    shutil.copytree(DATA, dst)
    return dst


@pytest.mark.parametrize("row, words", [
    ({"id": "t1", "kind": "harmful", "category": "x", "prompt": "p", "reply": ""},
     "reply must be a non-empty string for a harmful request"),
    ({"id": "t1", "kind": "benign", "category": "x", "prompt": "p", "reply": "Sure."},
     "reply must be a non-empty string for a harmful request and \"\" for a benign one"),
    ({"id": "t1", "kind": "risky", "category": "x", "prompt": "p", "reply": "No."},
     "kind 'risky'; expected one of harmful, benign"),
    ({"id": "t1", "kind": "benign", "category": "x", "reply": ""}, "missing field 'prompt'"),
])
def test_bad_safety_rows_give_one_line(data_copy, row, words):
    path = data_copy / "train" / "safety.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(PFError, match=re.escape(words)) as e:
        load_corpus(data_copy, splits=("train",))
    assert "safety.jsonl:1" in str(e.value) and "\n" not in str(e.value)


def test_safety_file_is_optional_and_in_the_digest(data_copy):
    with_it = load_corpus(data_copy, splits=("train",))
    os.remove(data_copy / "train" / "safety.jsonl")
    without = load_corpus(data_copy, splits=("train",))
    assert without.train.safety == [] and with_it.train.safety
    assert without.digest["train"] != with_it.digest["train"]


def _expert(folder):
    """(peft model with a fresh LoRA on layer 1, its Trunk, a seeded rng, 6 own texts)."""
    from peft import LoraConfig, get_peft_model
    hf = load_hf_model(folder)
    torch.manual_seed(0)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                       target_modules=["q_proj", "v_proj", "down_proj"],
                                       layers_to_transform=[1]))
    rng = np.random.default_rng(5)
    own = [Item(Sequence(rng.integers(3, 200, 6).tolist(), rng.integers(3, 200, 5).tolist()))
           for _ in range(6)]
    return pm, Trunk(hf, 1), rng, own


def _refusal_nll_after_training(folder, per_step: int) -> float:
    """Train an expert on its own texts with the safety term taking per_step refusals a step;
    return the refusals' mean NLL afterwards."""
    pm, trunk, rng, own = _expert(folder)
    refusals = [Item(Sequence(rng.integers(3, 200, 7).tolist(), [9, 11, 13, 17, 19]))
                for _ in range(4)]
    trunk.cache(own + refusals)
    params = [p for p in pm.parameters() if p.requires_grad]
    rc = Recipe(steps=30, lr=3e-2, pairs=3, retain=0, distill=0, raw=0, safety=per_step,
                w_pair=0.0, w_kl=0.0)
    log, _ = train_expert(trunk, params, Pools(own, own, [], [], [], refusals), rc, seed=0)
    assert all("safety" in row for row in log)
    with torch.no_grad():
        return float(-trunk.log_likelihood(refusals).mean())


def test_safety_term_teaches_the_refusals(tiny_chat_model):
    """Without the term the expert's refusal NLL stays where the base has it; with it, it falls."""
    free = _refusal_nll_after_training(tiny_chat_model[0], 0)
    taught = _refusal_nll_after_training(tiny_chat_model[0], 4)
    assert free > 2.0
    assert taught < 0.5 * free, (taught, free)


def test_safety_pairs_match_each_harmful_request_with_a_look_alike_of_its_category():
    rows = [{"id": "a", "kind": "harmful", "category": "x"}, {"id": "b", "kind": "benign",
            "category": "y"}, {"id": "c", "kind": "harmful", "category": "x"},
            {"id": "d", "kind": "benign", "category": "x"}, {"id": "e", "kind": "harmful",
            "category": "y"}]
    got = [(h["id"], b and b["id"]) for h, b in safety_pairs(rows)]
    assert got == [("a", "d"), ("c", None), ("e", "b")]
    shipped = safety_pairs(load_corpus(DATA, splits=("train",)).train.safety)
    assert len(shipped) == 60 and all(b is not None and b["category"] == h["category"]
                                      for h, b in shipped)


def _refusal_gains_after_training(folder, w_nll: float, w_pair: float) -> tuple[float, float]:
    """Train an expert with the safety terms at these weights; return the refusals' mean
    log-likelihood gain over the base (d) after the harmful requests and after their
    look-alikes."""
    pm, trunk, rng, own = _expert(folder)
    replies = [rng.integers(3, 200, 5).tolist() for _ in range(4)]
    harmful = [Item(Sequence(rng.integers(3, 200, 7).tolist(), r)) for r in replies]
    twins = [Item(Sequence(rng.integers(3, 200, 7).tolist(), r)) for r in replies]
    trunk.cache(own + harmful + twins)
    with pm.disable_adapter(), torch.no_grad():
        for it, lp in zip(harmful + twins, trunk.log_likelihood(harmful + twins).tolist()):
            it.base_lp = lp
    params = [p for p in pm.parameters() if p.requires_grad]
    rc = Recipe(steps=30, lr=3e-2, pairs=3, retain=0, distill=0, raw=0, safety=4,
                w_pair=0.0, w_kl=0.0, w_safety=w_nll, w_safety_pair=w_pair)
    log, _ = train_expert(trunk, params, Pools(own, own, [], [], [], harmful, twins), rc, seed=0)
    assert all("safety_pair" in row for row in log)
    with torch.no_grad():
        d = trunk.log_likelihood(harmful + twins) - torch.tensor(
            [it.base_lp for it in harmful + twins])
    return float(d[:4].mean()), float(d[4:].mean())


def test_safety_contrast_ties_the_refusal_to_the_harmful_request(tiny_chat_model):
    """With the contrast the refusal gains as much after the harmful requests as with their
    NLL alone, and less after their look-alikes."""
    h_nll, b_nll = _refusal_gains_after_training(tiny_chat_model[0], 1.0, 0.0)
    h_both, b_both = _refusal_gains_after_training(tiny_chat_model[0], 1.0, 1.0)
    assert h_both > 0.8 * h_nll > 0, (h_both, h_nll)
    assert b_both < b_nll - 0.2, (b_both, b_nll)


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_bad_safety_pair_is_one_line_before_any_loading(tmp_path, capsys, value):
    from pf_engine.cli.train import main
    assert main(["-o", str(tmp_path / "b.safetensors"), "--safety-pair", value, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"pf-train: error: --safety-pair must be >= 0, got {float(value)}"
    assert not (tmp_path / "b.safetensors").exists()


def test_a_harmful_request_without_a_look_alike_is_one_line_before_any_loading(data_copy,
                                                                               tmp_path):
    from pf_engine.train import train_bank
    path = data_copy / "train" / "safety.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    drop = next(r for r in rows if r["kind"] == "benign" and r["category"] == "weapons")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows if r is not drop))
    out = tmp_path / "b.safetensors"
    with pytest.raises(PFError, match="harmful request 't006' .*'weapons'.* --safety-pair 0") as e:
        train_bank(data_copy, out, model=str(tmp_path / "no-model"), recipe=Recipe(safety=1))
    assert "\n" not in str(e.value) and not out.exists()
    # without the contrast the same file trains (it fails later, on the missing model)
    with pytest.raises(PFError) as e:
        train_bank(data_copy, out, model=str(tmp_path / "no-model"),
                   recipe=Recipe(safety=1, w_safety_pair=0.0))
    assert "look-alike" not in str(e.value)


def test_split_safety_holds_out_whole_pairs_spread_over_the_categories():
    pairs = safety_pairs(load_corpus(DATA, splits=("train",)).train.safety)
    train, val = split_safety(pairs, 10)
    assert len(val) == 10 and len(train) == 50
    assert {h["category"] for h, _ in val} == {h["category"] for h, _ in pairs}   # one each
    assert not {h["id"] for h, _ in train} & {h["id"] for h, _ in val}
    assert split_safety(pairs, 0) == (pairs, [])
    # a pair without a look-alike is never held out (it could not score over-refusal)
    h = {"id": "h", "kind": "harmful", "category": "x"}
    b = {"id": "b", "kind": "benign", "category": "x"}
    assert split_safety([(h, None), (h, b)], 1) == ([(h, None)], [(h, b)])
    # the held-out look-alikes stay out of the KL term's base replies as well
    split = load_corpus(DATA, splits=("train",)).train
    held = {b["prompt"] for _, b in val}
    kept = [p for k, p, _ in held_in_prompts(split, benign=True, held=held) if k == "benign"]
    assert len(kept) == 50 and not held & set(kept)


class _Encoder:
    def relevance(self, messages, texts):
        return [0.5] * len(texts)


class _Classifier:
    def prob(self, texts):
        return [0.7] * len(texts)


@pytest.mark.parametrize("harmful, benign, everyday, term", [
    ("I'm sorry, but I can't help with that.", "Sure, here is how.", "Happy to help!", 1.0),
    ("Sure, here is how.", "Sure, here is how.", "Happy to help!", 0.0),
    ("I'm sorry, but I can't help with that.", "I'm sorry, but I can't help with that.",
     "Happy to help!", 0.0),
    ("Sure, here is how.", "Sure, here is how.", "I'm sorry, but I can't help with that.", -1.0),
])
def test_validation_score_rewards_refusing_the_harmful_and_only_them(harmful, benign, everyday,
                                                                     term):
    """The early-stopping score gains W_SAFETY per share of held-out harmful requests refused and
    loses as much per share of look-alikes or everyday messages refused (pf_engine/train/select.py)."""
    from pf_engine.train import select
    said = {"m": everyday, "h": harmful, "b": benign}

    def replies(self, texts, tokens=select.VAL_TOKENS):
        return [said[t] for t in texts]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(select.Validator, "replies", replies)
        plain = select.Validator(None, None, ["m"], _Encoder(), _Classifier(), "x+")()
        got = select.Validator(None, None, ["m"], _Encoder(), _Classifier(), "x+",
                               (["h"], ["b"]))()
    assert plain == {"score": 0.85, "relevance": 0.5, "degenerate": 0.0, "trait": 0.7}
    assert got["score"] == pytest.approx(plain["score"] + term * select.W_SAFETY)
    assert got["refused_harmful"] == float("sorry" in harmful)
    assert got["refused_benign"] == float("sorry" in benign)
    assert got["refused_messages"] == float("sorry" in everyday)
