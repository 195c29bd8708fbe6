"""Banks know their layers (issue 37): a (layer, module) whose experts are all zero is dropped
when a bank is built or loaded (persona/bank.py ``trim``), the file lists the layers kept
(persona/bank_file.py's ``layers`` header), the model attaches nothing there and does no expert work,
and the outputs equal the untrimmed bank's for every persona kind."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pf_engine import Engine
from pf_engine.backends import backend_status
from pf_engine.errors import LoadError
from pf_engine.model.config import ModelConfig
from pf_engine.persona import bank as bank_mod
from pf_engine.persona.bank import AdapterBank

LAYERS, UPPER = 4, [2, 3]          # the experts adapt the upper two of four layers
CPU = backend_status("cpu", torch.device("cpu"))[0]


@pytest.fixture(scope="module")
def model(hf_model_dir):
    return hf_model_dir("llama", "four_layers", num_hidden_layers=LAYERS)[0]


def upper_only(folder) -> AdapterBank:
    """A random bank (both routers) whose blocks below layer 2 are zero: B zero in layer 0, A
    zero in layer 1 (either makes the delta zero)."""
    cfg = ModelConfig.from_file(f"{folder}/config.json")
    full = AdapterBank.random(cfg, rank=4, seed=7, router=True)
    weights = {}
    for (l, m), (a, b) in full._weights.items():
        weights[(l, m)] = (a if l != 1 else torch.zeros_like(a), b if l != 0 else torch.zeros_like(b))
    kw = dict(full.for_model(cfg).__dict__)
    args = (full.expert_names, full.ranks, full.scalings, full.fingerprint, full.module_experts,
            weights)
    extra = dict(router=full.router, token_router=full.token_router, lora_alpha=kw["lora_alpha"],
                 use_rslora=kw["use_rslora"])
    return AdapterBank(*args, **extra)


def test_zero_blocks_are_dropped(model):
    bank = upper_only(model)
    assert bank.layers() == UPPER and bank.trimmed == 2 * 7
    assert all(bank.lora(l, m) is None for l in (0, 1) for m in bank.module_experts)


def test_an_untrained_bank_keeps_its_blocks(model):
    cfg = ModelConfig.from_file(f"{model}/config.json")
    full = AdapterBank.random(cfg, rank=4, seed=7)
    zero = {k: (a, torch.zeros_like(b)) for k, (a, b) in full._weights.items()}
    bank = AdapterBank(full.expert_names, full.ranks, full.scalings, full.fingerprint,
                       full.module_experts, zero)
    assert bank.layers() == list(range(LAYERS)) and bank.trimmed == 0


PERSONAS = {"explicit": {"extraversion+": 0.7, "agreeableness+": 0.4}, "auto": "auto",
            "token": "token"}


@pytest.mark.parametrize("backend,kw", [("torch", {}), ("cpu", {})] + ([
    ("cpu", dict(quantize="q4")), ("cpu", dict(deterministic=True))] if CPU else []),
    ids=["torch", "cpu-fp32", "cpu-q4", "cpu-fp32-deterministic"][:4 if CPU else 1])
def test_trimmed_equals_untrimmed_for_every_persona_kind(model, monkeypatch, backend, kw):
    """Where every product is the kernel's (4-bit, or deterministic fp32) its rows are the
    same bits without the zero experts; elsewhere a layer without experts takes torch's GEMM of
    W instead of [W; A_cat] or the kernel's, so within 1e-5 of the largest logit.  Greedy
    tokens equal."""
    exact = "quantize" in kw or "deterministic" in kw
    kw = dict(kw, backend=backend, progress=False, device="cpu")
    trimmed = Engine.from_pretrained(model, adapters=upper_only(model), **kw)
    with monkeypatch.context() as m:              # the bank as it was before trimming
        m.setattr(bank_mod, "trim", lambda w: (dict(w), 0))
        full = Engine.from_pretrained(model, adapters=upper_only(model), **kw)
    assert [len(lin.parts) > 0 for lin in full.model.blocks[0].linears] == [True] * 4
    ids = [[5, 17, 99, 3, 250, 41, 7, 8, 120, 33, 64, 2]]
    for kind, p in PERSONAS.items():
        a, b = trimmed.logits(ids, persona=p), full.logits(ids, persona=p)
        if exact:
            assert torch.equal(a, b), kind
        else:
            assert ((a - b).abs().max() / b.abs().max()).item() <= 1e-5, kind
        assert trimmed.generate(ids, max_new_tokens=12, persona=p)[0].token_ids == \
            full.generate(ids, max_new_tokens=12, persona=p)[0].token_ids, kind


def test_no_expert_work_below_the_first_adapted_layer(model, monkeypatch):
    """Counted: the Linears each mixed product runs on (torch backend, a top-2 persona, prefill
    and decode), and on the cpu backend the rank of every layer's kernel plan."""
    from pf_engine.backends.torch_backend import Torch
    eng = Engine.from_pretrained(model, adapters=upper_only(model), backend="torch",
                                 progress=False, device="cpu")
    layer_of = {id(lin): i for i, blk in enumerate(eng.model.blocks) for lin in blk.linears}
    seen = []
    mixed = Torch.mixed
    monkeypatch.setattr(Torch, "mixed", lambda self, lin, *a: seen.append(layer_of[id(lin)])
                        or mixed(self, lin, *a))
    eng.generate([[5, 17, 99, 3]], max_new_tokens=4, persona=PERSONAS["explicit"])
    assert seen and sorted(set(seen)) == UPPER
    assert all(not lin.parts for blk in eng.model.blocks[:2] for lin in blk.linears)
    if CPU:
        cpu = Engine.from_pretrained(model, adapters=upper_only(model), backend="cpu",
                                     progress=False, device="cpu")
        ranks = [[lin.state.plan.rank for lin in blk.linears] for blk in cpu.model.blocks]
        assert ranks[0] == ranks[1] == [0] * 4 and all(r > 0 for blk in ranks[2:] for r in blk)


def test_a_trimmed_bank_round_trips_through_its_file(model, tmp_path):
    bank = upper_only(model)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    tensors = load_file(path)
    assert not any(k.startswith(("layers.0.", "layers.1.")) for k in tensors)
    back = AdapterBank.load(path, ModelConfig.from_file(f"{model}/config.json"))
    assert back.layers() == UPPER and back.trimmed == 0
    assert all(torch.equal(back.lora(l, m).b, bank.lora(l, m).b)
               for l in UPPER for m in bank.module_experts)


@pytest.mark.parametrize("layers,words", [
    ({"q": [2, 9]}, ["layers['q']", "[0, 4)"]),
    ({"q": [3, 2]}, ["layers['q']", "increasing"]),
    ({"zz": [2]}, ["layers names module 'zz'"]),
])
def test_bad_layers_headers_are_one_line(model, tmp_path, layers, words):
    from safetensors import safe_open
    path = tmp_path / "bank.safetensors"
    upper_only(model).save(path)
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    meta["layers"] = json.dumps({**json.loads(meta["layers"]), **layers})
    save_file(load_file(path), path, metadata=meta)
    with pytest.raises(LoadError) as e:
        AdapterBank.load(path)
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_inspect_shows_the_layers(model, tmp_path, capsys):
    from pf_engine.cli.bank import layer_ranges, main
    assert layer_ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8" and layer_ranges([]) == "none"
    path = tmp_path / "bank.safetensors"
    upper_only(model).save(path)
    assert main(["inspect", str(path)]) == 0
    assert "layers   2-3 of 0-3" in capsys.readouterr().out
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"]["q"] == UPPER
