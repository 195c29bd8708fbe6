"""AdapterBank: PEFT import, file round trip, validation errors, and the pf-bank CLI.

Tiny random Llama models and PEFT adapters are built in a temporary folder; everything is offline.
"""
import json
import math
import os
import sys
import types

import pytest
import torch
from safetensors.torch import load_file, save_file

from pf_engine.persona.bank import BIG_FIVE, AdapterBank, LoraWeights
from pf_engine.cli.bank import main
from pf_engine.model.config import HF_MODULE_NAMES, MODULES, ModelConfig
from pf_engine.errors import LoadError, PFError

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256)
HF = {m: hf.split(".")[-1] for m, hf in HF_MODULE_NAMES.items()}     # "q" -> "q_proj"


def _llama(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))


def save_model_dir(path, **overrides):
    _llama(**overrides).config.save_pretrained(path)      # config.json is all a bank reads
    return str(path)


def make_peft(folder, seed=0, model_overrides=None, **lora):
    """Save a random PEFT LoRA adapter into ``folder``; return {(layer, module): (A, B, scaling)}
    read from the live PEFT model (not from the saved file)."""
    from peft import LoraConfig, get_peft_model
    model = _llama(**(model_overrides or {}))
    torch.manual_seed(seed)
    lora.setdefault("init_lora_weights", False)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    peft_model.save_pretrained(folder)
    out = {}
    for l, layer in enumerate(peft_model.base_model.model.model.layers):
        for m, hf in HF_MODULE_NAMES.items():
            mod = layer.get_submodule(hf)
            if hasattr(mod, "lora_A") and "default" in mod.lora_A:
                out[(l, m)] = (mod.lora_A["default"].weight.detach().clone(),
                               mod.lora_B["default"].weight.detach().clone(),
                               mod.scaling["default"])
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ModelConfig.from_file(os.path.join(
        save_model_dir(tmp_path_factory.mktemp("base")), "config.json"))


@pytest.fixture(scope="module")
def peft_experts(tmp_path_factory):
    """Three experts: different ranks, rsLoRA on/off, different target sets (list, all-linear,
    regex string)."""
    root = tmp_path_factory.mktemp("peft")
    specs = {
        "extraversion+": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "agreeableness+": dict(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear"),
        "neuroticism-": dict(r=16, lora_alpha=4, target_modules=r".*\.(o|gate|down)_proj"),
    }
    dirs, live = {}, {}
    for seed, (name, spec) in enumerate(specs.items()):
        dirs[name] = str(root / name.replace("+", "_hi").replace("-", "_lo"))
        live[name] = make_peft(dirs[name], seed=seed + 1, **spec)
    return dirs, live, specs


@pytest.fixture(scope="module")
def peft_bank(tiny, peft_experts):
    dirs, _, _ = peft_experts
    return AdapterBank.from_peft(tiny, dirs)


# PEFT import -------------------------------------------------------------------------------------
def test_from_peft_reproduces_each_adapter(tiny, peft_experts, peft_bank):
    dirs, live, specs = peft_experts
    bank = peft_bank
    names = list(dirs)
    assert bank.expert_names == names and bank.num_experts == 3
    assert bank.ranks == [4, 8, 16]
    assert bank.scalings == [8 / 4, 16 / math.sqrt(8), 4 / 16]
    assert bank.target_modules == list(MODULES)
    assert bank.fingerprint == tiny.fingerprint()
    for l in range(tiny.num_hidden_layers):
        for m in MODULES:
            lw = bank.lora(l, m)
            assert isinstance(lw, LoraWeights)
            covering = [k for k, n in enumerate(names) if (l, m) in live[n]]
            assert lw.expert_ids.tolist() == covering            # a lacking expert is absent
            offsets = [0]
            for k in covering:
                offsets.append(offsets[-1] + bank.ranks[k])
            assert lw.rank_offsets.tolist() == offsets
            d_out, d_in = tiny.module_shape(m)
            assert lw.a.shape == (offsets[-1], d_in) and lw.b.shape == (d_out, offsets[-1])
            for i, k in enumerate(covering):
                A, B, scaling = live[names[k]][(l, m)]
                s, e = offsets[i], offsets[i + 1]
                assert torch.equal(lw.a[s:e], A) and torch.equal(lw.b[:, s:e], B)
                assert bank.scalings[k] == scaling                # exactly PEFT's float
                assert lw.col_expert[s:e].tolist() == [k] * (e - s)
                assert torch.all(lw.col_scaling[s:e] == torch.tensor(scaling, dtype=torch.float32))
    assert bank.module_experts["q"] == [0, 1] and bank.module_experts["o"] == [1, 2]
    assert bank.expert_modules(0) == ["q", "v"]


@pytest.mark.parametrize("r,alpha,rslora", [(4, 8, False), (8, 8, True), (16, 32, False)])
def test_from_peft_single_expert_ranks(tmp_path, tiny, r, alpha, rslora):
    live = make_peft(tmp_path / "a", seed=r, r=r, lora_alpha=alpha, use_rslora=rslora,
                     target_modules=["k_proj", "up_proj"])
    bank = AdapterBank.from_peft(tiny, {"x": tmp_path / "a"})
    assert bank.target_modules == ["k", "up"] and bank.ranks == [r]
    assert bank.scalings == [alpha / math.sqrt(r) if rslora else alpha / r]
    assert bank.lora(0, "q") is None and bank.lora(1, "down") is None
    for (l, m), (A, B, scaling) in live.items():
        lw = bank.lora(l, m)
        assert torch.equal(lw.a, A) and torch.equal(lw.b, B) and bank.scalings[0] == scaling
        assert lw.expert_ids.tolist() == [0] and lw.rank_offsets.tolist() == [0, r]


def test_from_peft_layers_to_transform_keeps_only_those_layers(tmp_path, tiny):
    """The other layers' zero blocks are dropped (bank.trim): no expert work there."""
    live = make_peft(tmp_path / "a", r=4, lora_alpha=4, target_modules=["q_proj"],
                     layers_to_transform=[1])
    bank = AdapterBank.from_peft(tiny, {"x": tmp_path / "a"})
    assert set(live) == {(1, "q")}
    assert bank.lora(0, "q") is None and bank.layers() == [1] and bank.trimmed == 1
    assert torch.equal(bank.lora(1, "q").a, live[(1, "q")][0])


def _edit_config(folder, **changes):
    path = os.path.join(folder, "adapter_config.json")
    with open(path) as f:
        c = json.load(f)
    c.update(changes)
    with open(path, "w") as f:
        json.dump(c, f)


@pytest.fixture(scope="module")
def bad_peft(tmp_path_factory):
    """Folders PEFT itself writes that the engine must refuse."""
    from peft import LoHaConfig, LoraConfig, get_peft_model
    root = tmp_path_factory.mktemp("bad")
    out = {}
    for name, cfg in {
        "dora": LoraConfig(r=2, target_modules=["q_proj"], use_dora=True, init_lora_weights=False),
        "loha": LoHaConfig(r=2, target_modules=["q_proj"]),
        "lm_head": LoraConfig(r=2, target_modules=["q_proj", "lm_head"]),
        "embed": LoraConfig(r=2, target_modules=["embed_tokens"]),
        "bias": LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"),
    }.items():
        get_peft_model(_llama(), cfg).save_pretrained(root / name)
        out[name] = str(root / name)
    return out


@pytest.mark.parametrize("kind,words", [
    ("dora", ["DoRA"]), ("loha", ["LOHA", "LoRA"]), ("lm_head", ["lm_head", "q_proj"]),
    ("embed", ["embed_tokens"]), ("bias", ["bias", "lora_only"]),
])
def test_from_peft_refuses_unsupported_folders(tiny, bad_peft, kind, words):
    with pytest.raises(LoadError) as e:
        AdapterBank.from_peft(tiny, {"x": bad_peft[kind]})
    msg = str(e.value)
    assert "\n" not in msg and "'x'" in msg
    for w in words:
        assert w in msg


def test_from_peft_refuses_patterns_bin_and_missing(tmp_path, tiny, peft_experts):
    src = peft_experts[0]["extraversion+"]
    for key in ("rank_pattern", "alpha_pattern"):
        d = tmp_path / key
        d.mkdir()
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            (d / f).write_bytes(open(os.path.join(src, f), "rb").read())
        _edit_config(d, **{key: {"q_proj": 8}})
        with pytest.raises(LoadError, match=f"{key} is not supported"):
            AdapterBank.from_peft(tiny, {"x": d})
    # .bin weights: refused without being read (garbage bytes that unpickling would choke on)
    d = tmp_path / "bin"
    d.mkdir()
    (d / "adapter_config.json").write_bytes(open(os.path.join(src, "adapter_config.json"),
                                                 "rb").read())
    (d / "adapter_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(LoadError, match="re-save it as safetensors"):
        AdapterBank.from_peft(tiny, {"x": d})
    with pytest.raises(LoadError, match="no such folder"):
        AdapterBank.from_peft(tiny, {"x": tmp_path / "nope"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="no adapter_config.json"):
        AdapterBank.from_peft(tiny, {"x": tmp_path / "empty"})
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "adapter_config.json").write_bytes(open(os.path.join(src, "adapter_config.json"),
                                                 "rb").read())
    with pytest.raises(LoadError, match="no adapter_model.safetensors"):
        AdapterBank.from_peft(tiny, {"x": d})


def test_from_peft_refuses_adapter_of_another_model(tmp_path, tiny):
    make_peft(tmp_path / "a", r=4, lora_alpha=4, target_modules=["gate_proj"],
              model_overrides=dict(intermediate_size=96))
    with pytest.raises(LoadError) as e:
        AdapterBank.from_peft(tiny, {"x": tmp_path / "a"})
    assert "gate_proj" in str(e.value) and "[96, 4]" in str(e.value) and "[128, 4]" in str(e.value)


def test_bad_expert_names(tiny, peft_experts):
    src = peft_experts[0]["extraversion+"]
    for bad in ("", "a,b", "a=b", " a", "auto"):
        with pytest.raises(PFError, match="bad expert name"):
            AdapterBank.from_peft(tiny, {bad: src})


# File round trip and validation ------------------------------------------------------------------
def test_save_load_round_trip(tmp_path, tiny, peft_bank):
    path = tmp_path / "bank.safetensors"
    peft_bank.save(path)
    back = AdapterBank.load(path, tiny)
    for attr in ("expert_names", "ranks", "scalings", "target_modules", "fingerprint",
                 "module_experts", "lora_alpha", "use_rslora"):
        assert getattr(back, attr) == getattr(peft_bank, attr), attr
    assert back.nbytes == peft_bank.nbytes and back.router is None and back.token_router is None
    for l in range(tiny.num_hidden_layers):
        for m in MODULES:
            x, y = peft_bank.lora(l, m), back.lora(l, m)
            for f in ("a", "b", "expert_ids", "rank_offsets", "col_expert", "col_scaling"):
                assert torch.equal(getattr(x, f), getattr(y, f)), (l, m, f)
    assert sorted(os.listdir(tmp_path)) == ["bank.safetensors"]          # no temporary left
    half = AdapterBank.load(path, tiny, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.lora(0, "q").a.dtype == torch.bfloat16
    assert half.nbytes == peft_bank.nbytes // 2
    assert half.lora(0, "q").col_scaling.dtype == torch.float32
    assert AdapterBank.load(path).expert_names == peft_bank.expert_names   # without a config


def test_save_refuses_existing_and_cleans_up(tmp_path, tiny, monkeypatch):
    bank = AdapterBank.random(tiny, ["a", "b"], rank=4)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    before = path.read_bytes()
    with pytest.raises(PFError, match="already exists"):
        AdapterBank.random(tiny, ["a", "b"], rank=4, seed=1).save(path)
    assert path.read_bytes() == before
    AdapterBank.random(tiny, ["a", "b"], rank=4, seed=1).save(path, overwrite=True)
    assert path.read_bytes() != before

    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(PFError, match="disk full"):
        bank.save(tmp_path / "new.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["bank.safetensors"]


def test_load_refuses_bank_of_another_model(tmp_path, tiny):
    path = tmp_path / "bank.safetensors"
    AdapterBank.random(tiny, ["a", "b"], rank=4).save(path)
    wide = ModelConfig(**{**TINY, "hidden_size": 96, "num_attention_heads": 4})
    with pytest.raises(LoadError) as e:
        AdapterBank.load(path, wide)
    assert "hidden_size is 64 in the bank, 96 in the model" in str(e.value)
    # same fingerprint, other MLP width: the module and both shapes are named
    other = ModelConfig(**{**TINY, "intermediate_size": 96})
    with pytest.raises(LoadError) as e:
        AdapterBank.load(path, other)
    msg = str(e.value)
    assert "layers.0.gate.b (gate)" in msg and "[128, 8]" in msg and "[96, 8]" in msg
    assert str(path) in msg
    other_kv = ModelConfig(**{**TINY, "num_key_value_heads": 4})
    with pytest.raises(LoadError, match=r"layers\.0\.k\.b \(k\) has shape \[32, 8\], "
                                        r"expected \[64, 8\]"):
        AdapterBank.load(path, other_kv)


def test_load_refuses_truncated_foreign_and_tampered_files(tmp_path, tiny):
    path = tmp_path / "bank.safetensors"
    AdapterBank.random(tiny, ["a", "b"], rank=4, router=True).save(path)
    data = path.read_bytes()
    for n, cut in enumerate((len(data) - 100, 200, 5)):
        p = tmp_path / f"cut{n}.safetensors"
        p.write_bytes(data[:cut])
        with pytest.raises(LoadError) as e:
            AdapterBank.load(p, tiny)
        assert str(p) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(LoadError, match="no adapter bank at"):
        AdapterBank.load(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"x": torch.zeros(2)}, foreign)
    with pytest.raises(LoadError, match="not an adapter bank"):
        AdapterBank.load(foreign)
    # a rank that does not add up
    tensors = load_file(path)
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
    bad = dict(meta, ranks=json.dumps([4, 5]))
    p = tmp_path / "ranks.safetensors"
    save_file(tensors, p, metadata=bad)
    with pytest.raises(LoadError, match=r"layers\.0\.q\.a \(q\) has shape \[8, 64\], expected "
                                        r"\[9, 64\]"):
        AdapterBank.load(p, tiny)
    p = tmp_path / "extra.safetensors"
    save_file({**tensors, "stray": torch.zeros(1)}, p, metadata=meta)
    with pytest.raises(LoadError, match="unexpected tensor stray"):
        AdapterBank.load(p, tiny)
    p = tmp_path / "missing_tensor.safetensors"
    save_file({k: v for k, v in tensors.items() if k != "layers.1.down.b"}, p, metadata=meta)
    with pytest.raises(LoadError, match=r"layers\.1\.down\.b is missing"):
        AdapterBank.load(p, tiny)


def test_random_bank(tiny):
    a = AdapterBank.random(tiny)
    b = AdapterBank.random(tiny)
    c = AdapterBank.random(tiny, seed=1)
    assert a.expert_names == BIG_FIVE and a.ranks == [16] * 10 and a.scalings == [2.0] * 10
    assert torch.equal(a.lora(1, "down").b, b.lora(1, "down").b)
    assert not torch.equal(a.lora(1, "down").b, c.lora(1, "down").b)
    assert torch.count_nonzero(a.lora(0, "q").b) == a.lora(0, "q").b.numel()
    assert a.router is None and a.token_router is None
    mixed = AdapterBank.random(tiny, ["x", "y", "z"], rank=[2, 4, 8],
                               modules={"x": ["q"], "y": ["q", "down"], "z": ["down"]})
    assert mixed.target_modules == ["q", "down"] and mixed.lora(0, "v") is None
    assert mixed.lora(0, "q").expert_ids.tolist() == [0, 1]
    assert mixed.lora(0, "q").rank_offsets.tolist() == [0, 2, 6]
    assert mixed.lora(0, "down").col_expert.tolist() == [1] * 4 + [2] * 8
    with pytest.raises(PFError, match="unknown module 'lm_head'"):
        AdapterBank.random(tiny, ["x"], modules=["lm_head"])


def test_to_casts_loras_keeps_routers_fp32(tiny):
    bank = AdapterBank.random(tiny, ["a", "b", "c"], rank=4, router=True)
    n = bank.nbytes
    lora_bytes = sum(t.numel() * 4 for k, t in bank.tensors().items() if k.startswith("layers."))
    assert bank.to(dtype=torch.float16) is bank
    assert bank.dtype == torch.float16 and bank.lora(1, "up").b.dtype == torch.float16
    assert bank.router.w1.dtype == torch.float32
    assert bank.token_router.w[0].dtype == torch.float32
    assert bank.nbytes == n - lora_bytes // 2


def test_require_router(tiny):
    bank = AdapterBank.random(tiny, ["extraversion+", "agreeableness+"], rank=2)
    with pytest.raises(PFError) as e:
        bank.require_router("sequence")
    assert str(e.value).startswith("this bank has no sequence router: use explicit persona "
                                   "weights, e.g. ")
    assert "extraversion+=" in str(e.value)
    with pytest.raises(PFError, match="no token router"):
        bank.require_router("token")
    routed = AdapterBank.random(tiny, ["a", "b"], rank=2, router=True)
    assert routed.require_router("sequence") is routed.router
    assert routed.require_router("token") is routed.token_router


# CLI ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model_dir(tmp_path_factory.mktemp("model"))


def test_cli_build_and_inspect(tmp_path, model_dir, peft_experts, capsys):
    dirs = peft_experts[0]
    out = tmp_path / "bank.safetensors"
    argv = ["build", "--base", model_dir, "-o", str(out)]
    for n, d in dirs.items():
        argv += ["--expert", f"{n}={d}"]
    assert main(argv) == 0
    assert "wrote" in capsys.readouterr().err
    bank = AdapterBank.load(out, ModelConfig.from_file(os.path.join(model_dir, "config.json")))
    assert bank.expert_names == list(dirs)
    assert main(argv) == 2                                            # exists: refused
    err = capsys.readouterr().err
    assert err.startswith("pf-bank: error: ") and "--overwrite" in err and err.count("\n") == 1
    assert main(argv + ["--overwrite"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    for word in ("extraversion+", "agreeableness+", "neuroticism-", "5.65685", "0.25",
                 "router   none", "bytes", "q,v"):
        assert word in text, word
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [e["rank"] for e in info["experts"]] == [4, 8, 16] and info["router"] is None
    assert info["bytes"] == bank.nbytes


def test_cli_build_failure_leaves_no_file(tmp_path, model_dir, bad_peft, peft_experts, capsys):
    out = tmp_path / "bank.safetensors"
    good = peft_experts[0]["extraversion+"]
    rc = main(["build", "--base", model_dir, "--expert", f"good={good}",
               "--expert", f"bad={bad_peft['dora']}", "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("pf-bank: error: ") and "DoRA" in err
    assert "Traceback" not in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []
    assert main(["build", "--base", model_dir, "--expert", "nofolder", "-o", str(out)]) == 2
    assert "NAME=PEFT_DIR" in capsys.readouterr().err
    assert main(["build", "--base", str(tmp_path / "nomodel"), "--expert", f"g={good}",
                 "-o", str(out)]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path / "missing.safetensors")]) == 2
    assert "no adapter bank at" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_cli_random(tmp_path, model_dir, capsys, monkeypatch):
    out = tmp_path / "r.safetensors"
    assert main(["random", "--base", model_dir, "--rank", "4", "--modules", "q,down",
                 "--router", "--seed", "3", "-o", str(out)]) == 0
    bank = AdapterBank.load(out)
    assert bank.expert_names == BIG_FIVE and bank.ranks == [4] * 10
    assert bank.target_modules == ["q", "down"]
    assert bank.router is not None and bank.token_router is not None
    ref = AdapterBank.random(bank_cfg(model_dir), rank=4, modules=["q", "down"], seed=3,
                             router=True)
    assert torch.equal(bank.lora(1, "q").a, ref.lora(1, "q").a)
    assert torch.equal(bank.router.w1, ref.router.w1)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "router   sequence:" in text and "router   token:" in text
    assert main(["random", "--base", model_dir, "--experts", "a,b", "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["random", "--base", model_dir, "--experts", "a,b", "--modules", "q,lm_head",
                 "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "lm_head" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    # without --base: the bundled default model's folder
    fake = types.ModuleType("pf_engine.model.bundled")
    fake.default_model_dir = lambda: model_dir
    monkeypatch.setitem(sys.modules, "pf_engine.model.bundled", fake)
    assert main(["random", "--experts", "a,b", "--rank", "2", "-o",
                 str(tmp_path / "d.safetensors")]) == 0
    assert AdapterBank.load(tmp_path / "d.safetensors").expert_names == ["a", "b"]


def bank_cfg(model_dir):
    return ModelConfig.from_file(os.path.join(model_dir, "config.json"))
