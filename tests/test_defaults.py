"""Generation defaults: what pf-generate and pf-serve use for the sampling fields a user leaves
out (the model's generation_config.json where it speaks of sampling, else CHAT_DEFAULTS for chat
and greedy for plain completion), checked against Engine.generate with those values given."""
import json
import os
import shutil

import pytest

from pf_engine import Engine
from pf_engine.cli.generate import main as generate_main
from pf_engine.generation.sampling import CHAT_DEFAULTS, GREEDY, generation_defaults


@pytest.fixture(scope="module")
def engine(tiny_chat_model):
    folder, _ = tiny_chat_model
    return Engine.from_pretrained(folder, progress=False, device="cpu", dtype="fp32")


def _with_config(src, tmp_path, cfg):
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    if cfg is None:
        os.remove(dst / "generation_config.json")
    else:
        (dst / "generation_config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.mark.parametrize("cfg,chat,want", [
    (None, True, CHAT_DEFAULTS),                                          # no file
    ({"bos_token_id": 1, "eos_token_id": 2}, True, CHAT_DEFAULTS),        # silent on sampling
    ({"bos_token_id": 1, "eos_token_id": 2}, False, GREEDY),
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.95}, True,
     {"temperature": 0.6, "top_p": 0.95, "top_k": 50, "repetition_penalty": 1.0}),
    ({"do_sample": True, "temperature": 0.6}, False,                      # the model decides
     {"temperature": 0.6, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}),
    ({"do_sample": False, "temperature": 0.6, "repetition_penalty": 1.3}, True,
     dict(GREEDY, repetition_penalty=1.3)),                               # greedy, as transformers
])
def test_generation_defaults_follow_the_model_config(tiny_chat_model, tmp_path, cfg, chat, want):
    folder = _with_config(tiny_chat_model[0], tmp_path, cfg)
    got, source = generation_defaults(folder, chat)
    assert got == want
    assert ("generation_config.json" in source) == (cfg is not None and ("do_sample" in cfg))


def test_bundled_model_gets_the_chat_defaults(converted_smollm2):
    """The bundled GGUF carries no sampling config: chat gets CHAT_DEFAULTS (README says so)."""
    got, source = generation_defaults(converted_smollm2, chat=True)
    assert got == CHAT_DEFAULTS and "chat default" in source
    assert CHAT_DEFAULTS == {"temperature": 0.2, "top_p": 0.9, "top_k": 0,
                             "repetition_penalty": 1.1}


def _cli(capsys, *argv):
    rc = generate_main(list(argv))
    out, err = capsys.readouterr()
    assert rc == 0, err
    return json.loads(out.splitlines()[0]), err


def test_pf_generate_chat_uses_the_defaults_for_fields_not_given(engine, capsys):
    folder = engine.folder
    got, err = _cli(capsys, "hello there", "--model", folder, "--chat", "--json", "--seed", "3",
                    "--max-new-tokens", "8")
    assert "sampling: temperature=0.2, top_p=0.9, top_k=0, repetition_penalty=1.1" in err
    want = engine.generate(["hello there"], chat=True, max_new_tokens=8, seed=3,
                           **CHAT_DEFAULTS)[0]
    assert got["token_ids"] == want.token_ids
    # a field given wins, the others keep their defaults
    got, err = _cli(capsys, "hello there", "--model", folder, "--chat", "--json", "--seed", "3",
                    "--max-new-tokens", "8", "--temperature", "0")
    assert "temperature=0," in err and "repetition_penalty=1.1" in err
    want = engine.generate(["hello there"], chat=True, max_new_tokens=8,
                           **dict(CHAT_DEFAULTS, temperature=0))[0]
    assert got["token_ids"] == want.token_ids
    # plain completion stays greedy
    got, _ = _cli(capsys, "hello there", "--model", folder, "--json", "--max-new-tokens", "8",
                  "--quiet")
    assert got["token_ids"] == engine.generate(["hello there"], max_new_tokens=8)[0].token_ids


def test_pf_generate_bad_sampling_value_is_one_line_before_loading(capsys):
    rc = generate_main(["hi", "--model", "/nonexistent", "--top-p", "0"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1 and "top_p=0.0" in err


def test_pf_serve_chat_defaults(engine):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from pf_engine.serve import build_app
    from pf_engine.serve.threaded import ThreadedServer
    engine.new_scheduler(slots=2, max_len=128)
    server = ThreadedServer(build_app(engine, "tiny", max_queue=8, timeout_s=60))
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
        msgs = [{"role": "user", "content": "hello there"}]
        r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, seed=5)
        want = engine.generate(["hello there"], chat=True, max_new_tokens=8, seed=5,
                               **CHAT_DEFAULTS)[0]
        assert r.choices[0].message.content == want.text
        # the extension fields are read too
        r = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=8, seed=5,
                                      temperature=0.7,
                                      extra_body={"top_k": 5, "repetition_penalty": 1.0})
        want = engine.generate(["hello there"], chat=True, max_new_tokens=8, seed=5,
                               temperature=0.7, top_p=0.9, top_k=5)[0]
        assert r.choices[0].message.content == want.text
    finally:
        server.close()
