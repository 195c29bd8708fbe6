"""pf_engine.tokenizer reads tokenizer.json and the chat template without transformers: it must
give transformers' ids and text exactly, on the tiny fixture's tokenizer (a template in
tokenizer_config.json), on a GGUF's converted one, and on the bundled model's (a template in
chat_template.jinja), and never import transformers for generation."""
import subprocess
import sys

import pytest

TEXTS = ["Hello world!", "  two  spaces,\nnewlines\tand tabs ",
         "caf\u00e9 na\u00efve \u00fcber \u2014 \u201cquoted\u201d \u65e5\u672c \U0001F642",
         "isn't it ? yes , it is .", "<|im_start|>user\nhi<|im_end|>", "the quick brown fox"]
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye now"}]


def same_as_transformers(folder):
    from transformers import AutoTokenizer

    from pf_engine.tokenizer import Tokenizer
    ours, hf = Tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    assert ours.eos_token_id == hf.eos_token_id
    for text in TEXTS:
        ids = hf.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
        chat = hf.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                      tokenize=False)
        assert ours.encode(text, chat=True) == hf.encode(chat, add_special_tokens=False), text
    chat = hf.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
    assert ours.render(CONVERSATION) == chat
    assert ours.encode_chat(CONVERSATION) == hf.encode(chat, add_special_tokens=False)


def test_tiny_tokenizer_matches_transformers(tiny_chat_model):
    same_as_transformers(tiny_chat_model[0])


def test_gguf_tokenizer_matches_transformers(tmp_path):
    from gguf_fixtures import write_tiny_gguf

    from pf_engine.model.gguf_import import convert_gguf
    write_tiny_gguf(tmp_path / "t.gguf")
    same_as_transformers(convert_gguf(str(tmp_path / "t.gguf"), str(tmp_path / "hf"), progress=False))


def test_bundled_tokenizer_matches_transformers(converted_smollm2):
    same_as_transformers(converted_smollm2)


def test_no_chat_template_is_one_line(tiny_chat_model, tmp_path):
    import shutil

    from pf_engine.errors import RequestError
    from pf_engine.tokenizer import Tokenizer
    shutil.copy(f"{tiny_chat_model[0]}/tokenizer.json", tmp_path / "tokenizer.json")
    tok = Tokenizer(str(tmp_path))
    with pytest.raises(RequestError, match="has no chat template"):
        tok.encode("hi", chat=True)
    assert tok.encode("hi") == Tokenizer(tiny_chat_model[0]).encode("hi")


def test_generation_never_imports_transformers(bundled_pf_home):
    code = ("import sys; from pf_engine import Engine; e = Engine.from_pretrained(progress=False); "
            "e.generate(['Hi'], max_new_tokens=2, chat=True); "
            "print(any(m.startswith('transformers') for m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_multiline_template_whitespace_matches_transformers(tiny_chat_model, tmp_path):
    """Block tags on their own lines: transformers renders with trim_blocks and lstrip_blocks."""
    import json
    import shutil
    src = tiny_chat_model[0]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{name}", tmp_path / name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}\n    {% if m['role'] == 'system' %}\n[{{ m['content'] }}]\n"
                            "    {% else %}\n{{ m['role'] }}: {{ m['content'] | trim }}\n    {% endif %}\n"
                            "{% endfor %}\n{% if add_generation_prompt %}\nassistant: {{ eos_token }}\n{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    same_as_transformers(str(tmp_path))
