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


def _refusal_nll_after_training(folder, per_step: int) -> float:
    """Train an expert on its own texts with the safety term taking per_step refusals a step;
    return the refusals' mean NLL afterwards."""
    from peft import LoraConfig, get_peft_model
    hf = load_hf_model(folder)
    torch.manual_seed(0)
    pm = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                       target_modules=["q_proj", "v_proj", "down_proj"],
                                       layers_to_transform=[1]))
    trunk = Trunk(hf, 1)
    rng = np.random.default_rng(5)
    own = [Item(Sequence(rng.integers(3, 200, 6).tolist(), rng.integers(3, 200, 5).tolist()))
           for _ in range(6)]
    refusals = [Item(Sequence(rng.integers(3, 200, 7).tolist(), [9, 11, 13, 17, 19]))
                for _ in range(4)]
    trunk.cache(own + refusals)
    params = [p for p in pm.parameters() if p.requires_grad]
    rc = Recipe(steps=30, lr=3e-2, pairs=3, retain=0, distill=0, raw=0, safety=per_step,
                w_pair=0.0, w_kl=0.0)
    log, _ = train_expert(trunk, params, Pools(own, own, [], [], [], safety=refusals), rc, seed=0)
    assert all("safety" in row for row in log)
    with torch.no_grad():
        return float(-trunk.log_likelihood(refusals).mean())


def test_safety_term_teaches_the_refusals(tiny_chat_model):
    """Without the term the expert's refusal NLL stays where the base has it; with it, it falls."""
    free = _refusal_nll_after_training(tiny_chat_model[0], 0)
    taught = _refusal_nll_after_training(tiny_chat_model[0], 4)
    assert free > 2.0
    assert taught < 0.5 * free, (taught, free)
