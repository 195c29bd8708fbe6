"""Engine API on text: tokenizer, chat template, stop strings, streaming, and bad input."""
import json
import os
import re
import shutil

import pytest
import torch

from pf_engine import Engine, LoadError, PFError, RequestError
from pf_engine.cli import generate as cli


@pytest.fixture(scope="module")
def chat(tiny_chat_model):
    folder, hf = tiny_chat_model
    return Engine.from_pretrained(folder, device="cpu", dtype="fp32"), hf


def test_text_generation_matches_transformers(chat):
    eng, hf = chat
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(eng.folder)
    prompt = "the quick brown fox"
    ids = tok(prompt, return_tensors="pt").input_ids
    ref = hf.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:].tolist()
    out = eng.generate(prompt, max_new_tokens=20)[0]
    assert out.token_ids == ref
    body = ref[:-1] if ref and ref[-1] == tok.eos_token_id else ref
    assert out.text == tok.decode(body, skip_special_tokens=True)


def test_chat_template_is_applied(chat):
    eng, _ = chat
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(eng.folder)
    want = tok.apply_chat_template([{"role": "user", "content": "hello"}],
                                   add_generation_prompt=True, tokenize=True)
    if isinstance(want, dict) or hasattr(want, "input_ids"):
        want = want["input_ids"]
    out = eng.generate("hello", max_new_tokens=3, chat=True)[0]
    assert out.usage["prompt_tokens"] == len(want)
    assert eng.tokenizer.encode("hello", chat=True) == list(want)


def test_stream_yields_the_generated_text(chat):
    eng, _ = chat
    kw = dict(max_new_tokens=24, temperature=0.9, seed=7)
    pieces = list(eng.stream("hello world", **kw))
    assert "".join(pieces) == eng.generate("hello world", **kw)[0].text
    assert len(pieces) >= 2


def test_stream_restores_thread_settings_while_paused(chat):
    """Single-row CPU decode runs torch at one thread; the caller's code between pieces must
    see its own settings (its backend's thread policy, backends/threads.py, puts it back after every forward),
    and decode still works."""
    eng, _ = chat
    before = torch.get_num_threads()
    if before < 2:
        torch.set_num_threads(2)
    try:
        want = torch.get_num_threads()
        seen = []
        for piece in eng.stream("hello world", max_new_tokens=12, temperature=0.9, seed=3):
            seen.append(torch.get_num_threads())
        assert len(seen) >= 3 and set(seen) == {want}
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)


def test_stop_string_cuts_text_and_finishes(chat):
    eng, _ = chat
    full = eng.generate("the lazy", max_new_tokens=24)[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    out = eng.generate("the lazy", max_new_tokens=24, stop=[stop])[0]
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.find(stop)]
    assert "".join(eng.stream("the lazy", max_new_tokens=24, stop=stop)) == out.text


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(temperature=-0.5), "temperature=-0.5"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
    (dict(top_k=-1), "top_k=-1"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0"),
])
def test_bad_sampling_arguments(chat, kw, match):
    eng, _ = chat
    with pytest.raises(RequestError, match=match):
        eng.generate("hi", **kw)


def test_empty_and_bad_prompts(chat):
    eng, _ = chat
    for bad in ("", [""], [], [[]]):
        with pytest.raises(RequestError, match="empty|expected"):
            eng.generate(bad)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        eng.generate([[1, 2, 10**6]])


def test_prompt_longer_than_context(hf_model_dir):
    folder, _ = hf_model_dir("llama", "llama_short_ctx", max_position_embeddings=32)
    eng = Engine.from_pretrained(folder, device="cpu", dtype="fp32")
    long = list(range(3, 43))
    with pytest.raises(RequestError, match="40 tokens; the context holds 32"):
        eng.generate(long, max_new_tokens=4)
    out = eng.generate(long, max_new_tokens=4, truncate=True)[0]
    assert out.usage["prompt_tokens"] == 28 and len(out.token_ids) == 4
    # a prompt that fits but leaves less room than max_new_tokens stops at the context's end
    out = eng.generate(list(range(3, 33)), max_new_tokens=8)[0]
    assert len(out.token_ids) <= 2 and out.finish_reason in ("length", "stop")


def test_missing_paths_and_pickles(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        Engine.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(LoadError, match="no config.json"):
        Engine.from_pretrained(str(tmp_path))
    (tmp_path / "model.bin").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(LoadError, match="pickled checkpoint"):
        Engine.from_pretrained(str(tmp_path / "model.bin"))


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_bin_folder_refused(hf_model_dir, tmp_path):
    folder, _ = hf_model_dir("llama", "llama_untied")
    d = copy_model(folder, tmp_path / "m")
    os.rename(os.path.join(d, "model.safetensors"), os.path.join(d, "pytorch_model.bin"))
    with pytest.raises(LoadError, match="pytorch_model.bin is a pickled checkpoint"):
        Engine.from_pretrained(d)


def rewrite_safetensors(folder, edit):
    from safetensors.torch import load_file, save_file
    p = os.path.join(folder, "model.safetensors")
    sd = load_file(p)
    edit(sd)
    save_file(sd, p, metadata={"format": "pt"})


def test_missing_tensor_is_named(hf_model_dir, tmp_path):
    folder, _ = hf_model_dir("llama", "llama_untied")
    d = copy_model(folder, tmp_path / "m")
    rewrite_safetensors(d, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(LoadError, match=r"model.layers.1.mlp.up_proj.weight is missing.*\[128, 64\]"):
        Engine.from_pretrained(d)


def test_wrong_shape_names_both_shapes(hf_model_dir, tmp_path):
    folder, _ = hf_model_dir("llama", "llama_untied")
    d = copy_model(folder, tmp_path / "m")

    def shrink(sd):
        sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    rewrite_safetensors(d, shrink)
    with pytest.raises(LoadError, match=r"k_proj.weight has shape \[16, 64\], expected \[32, 64\]"):
        Engine.from_pretrained(d)


def test_truncated_safetensors(hf_model_dir, tmp_path):
    folder, _ = hf_model_dir("llama", "llama_untied")
    d = copy_model(folder, tmp_path / "m")
    p = os.path.join(d, "model.safetensors")
    data = open(p, "rb").read()
    open(p, "wb").write(data[: len(data) // 2])
    with pytest.raises(LoadError, match="model.safetensors"):
        Engine.from_pretrained(d)


def test_unsupported_architecture(hf_model_dir, tmp_path):
    folder, _ = hf_model_dir("llama", "llama_untied")
    d = copy_model(folder, tmp_path / "m")
    p = os.path.join(d, "config.json")
    cfg = json.load(open(p))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(p, "w"))
    with pytest.raises(PFError, match="'GPT2LMHeadModel'.*LlamaForCausalLM, MistralForCausalLM, "
                                      "Qwen2ForCausalLM"):
        Engine.from_pretrained(d)


def test_bad_device_and_dtype(hf_model_dir):
    folder, _ = hf_model_dir("llama", "llama_untied")
    with pytest.raises(PFError, match="dtype='int8'"):
        Engine.from_pretrained(folder, dtype="int8")
    with pytest.raises(PFError, match="device='tpu'"):
        Engine.from_pretrained(folder, device="tpu")


# The CLI -------------------------------------------------------------------------------------
def test_cli_json(chat, capsys):
    eng, _ = chat
    assert cli.main(["the quick", "hello", "--model", eng.folder, "--json", "--max-new-tokens", "5",
                     "--quiet"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    objs = [json.loads(ln) for ln in lines]
    assert len(objs) == 2
    want = eng.generate(["the quick", "hello"], max_new_tokens=5)
    assert [o["token_ids"] for o in objs] == [w.token_ids for w in want]
    assert all(o["usage"]["completion_tokens"] == len(o["token_ids"]) for o in objs)


def test_cli_stdin_and_timings(chat, capsys, monkeypatch):
    import io
    eng, _ = chat
    monkeypatch.setattr("sys.stdin", io.StringIO("the lazy dog\n"))
    assert cli.main(["--model", eng.folder, "--max-new-tokens", "4"]) == 0
    cap = capsys.readouterr()
    assert cap.out.strip() == eng.generate("the lazy dog", max_new_tokens=4)[0].text.strip()
    assert "prefill" in cap.err and "decode" in cap.err and "tok/s" in cap.err


def test_cli_lines_one_prompt_per_non_empty_line(chat, capsys, monkeypatch):
    import io
    eng, _ = chat
    monkeypatch.setattr("sys.stdin", io.StringIO("the quick\n\n  \nhello world\n"))
    assert cli.main(["--model", eng.folder, "--lines", "--json", "--max-new-tokens", "4",
                     "--quiet"]) == 0
    objs = [json.loads(ln) for ln in capsys.readouterr().out.strip().splitlines()]
    want = eng.generate(["the quick", "hello world"], max_new_tokens=4)
    assert [o["token_ids"] for o in objs] == [w.token_ids for w in want]
    monkeypatch.setattr("sys.stdin", io.StringIO("the quick\nhello world\n"))
    assert cli.main(["--model", eng.folder, "--json", "--max-new-tokens", "4", "--quiet"]) == 0
    objs = [json.loads(ln) for ln in capsys.readouterr().out.strip().splitlines()]
    assert len(objs) == 1          # without --lines, stdin is one prompt


def test_backend_status_and_resolution(monkeypatch):
    from pf_engine.backends import backend_status, resolve_backend
    cpu = torch.device("cpu")
    assert backend_status("torch", cpu) == (True, "") and backend_status("naive", cpu)[0]
    ok, why = backend_status("cuda", cpu)
    assert not ok and "no GPU" in why
    ok, why = backend_status("tpu", cpu)
    assert not ok and "unknown backend" in why
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ok, why = backend_status("triton", cpu)
    assert not ok and ("TRITON_INTERPRET=1" in why or "cannot be imported" in why)
    auto = "cpu" if backend_status("cpu", cpu)[0] else "torch"      # csrc/cpu built: it wins
    assert resolve_backend(None, cpu).name == auto and resolve_backend("auto", cpu).name == auto
    monkeypatch.setattr("pf_engine.backends.backend_status",
                        lambda name, device: (name != "cpu", "not built"))
    assert resolve_backend("auto", cpu).name == "torch"                # the build failed: torch
    monkeypatch.undo()
    assert resolve_backend("naive", cpu).name == "naive"
    for name, words in (("cuda", "backend='cuda' is not available: no GPU"),
                        ("triton", "backend='triton' is not available"),
                        ("tpu", "unknown backend; expected one of auto, torch")):
        with pytest.raises(PFError, match=re.escape(words)):
            resolve_backend(name, cpu)
    # on a GPU too, even where both kernels run: torch measured fastest there (gpu_mixing.json)
    monkeypatch.setattr("pf_engine.backends.backend_status", lambda name, device: (True, ""))
    assert resolve_backend("auto", torch.device("cuda")).name == "torch"


@pytest.mark.parametrize("argv, match", [
    (["x", "--top-p", "2"], "top_p=2.0"),
    (["x", "--max-new-tokens", "0"], "max_new_tokens=0"),
    (["x", "--temperature", "-1"], "temperature=-1.0"),
    (["x", "--model", "/nonexistent/model"], "does not exist"),
    (["x", "--max-new-tokens", "many"], "invalid int value"),
])
def test_cli_bad_arguments_one_line_exit_2(argv, match, capsys):
    try:
        code = cli.main(argv + ["--quiet"])
    except SystemExit as e:       # argparse's own usage errors
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and match in err and err.startswith("pf-generate: error:")


@pytest.mark.parametrize("prog, argv, match", [
    ("generate", ["x", "--persona", "openness+=abc"], "weight 'abc' of 'openness+' is not a number"),
    ("generate", ["x", "--backend", "tpu"], "backend='tpu': unknown backend"),
    ("generate", ["x", "--dtype", "fp8"], "dtype='fp8'"),
    ("generate", ["x", "--device", "tpu"], "device='tpu'"),
    ("generate", ["x", "--threads", "0"], "--threads 0"),
    ("serve", ["--backend", "tpu"], "backend='tpu': unknown backend"),
    ("serve", ["--dtype", "int3"], "dtype='int3'"),
    ("serve", ["--threads", "-2"], "--threads -2"),
    ("serve", ["--grace-s", "0"], "--grace-s 0.0: expected a number > 0"),
    ("serve", ["--max-body-mb", "nan"], "--max-body-mb nan"),
    ("serve", ["--max-connections", "0"], "--max-connections 0"),
])
def test_cli_checks_arguments_before_loading(prog, argv, match, capsys, monkeypatch):
    """A bad value is named in one line before any model is loaded (loading takes seconds)."""
    from pf_engine.cli import serve
    from pf_engine.engine import Engine

    def never(*a, **k):
        raise AssertionError("the model was loaded before the arguments were checked")
    monkeypatch.setattr(Engine, "from_pretrained", never)
    threads = torch.get_num_threads()
    code = (cli if prog == "generate" else serve).main(argv + (["--quiet"] if prog == "generate" else []))
    torch.set_num_threads(threads)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and match in err, err
    assert err.startswith(f"pf-{prog}: error:")
