"""Text <-> token ids, the chat template, and incremental detokenisation for streaming.

Reads the fast tokenizer saved in an HF folder (tokenizer.json + tokenizer_config.json and its chat
template) as transformers does, without importing it.  A model folder without a tokenizer still
serves token ids.
"""
from __future__ import annotations

import datetime
import json
import os

from pf_engine.model.checks import one_line
from pf_engine.errors import LoadError, RequestError


class Tokenizer:
    """The folder's fast tokenizer (``tokenizers``, what transformers' fast tokenizers wrap) and
    its chat template (tokenizer_config.json's, or chat_template.jinja), rendered as
    transformers renders it (a sandboxed jinja2 environment with trim_blocks and lstrip_blocks,
    the special tokens as variables).  transformers itself is loaded only when ``hf`` is asked
    for (pf-serve's tokenize endpoints, training): importing it costs ~130 MB, a third of what
    the bundled 4-bit model needs in all."""

    def __init__(self, folder: str):
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise LoadError(f"no tokenizer.json in {folder}")
        from tokenizers import Tokenizer as Fast
        try:
            self.fast = Fast.from_file(path)
            cfg = _read_json(os.path.join(folder, "tokenizer_config.json"))
        except Exception as e:  # tokenizers raises its own exception types for a broken file
            raise LoadError(f"cannot load the tokenizer in {folder}: {one_line(e)}") from None
        self.folder = folder
        self.chat_template = _chat_template(folder, cfg)
        self.specials = {k: _token_text(cfg.get(k))
                         for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        self.clean_up = bool(cfg.get("clean_up_tokenization_spaces", False))
        eos = self.specials["eos_token"]
        self.eos_token_id = self.fast.token_to_id(eos) if eos else None
        self._hf = None
        self._template = None

    @property
    def hf(self):
        """transformers' tokenizer for the folder (loaded on first use)."""
        if self._hf is None:
            from transformers import AutoTokenizer
            try:
                self._hf = AutoTokenizer.from_pretrained(self.folder)
            except Exception as e:  # transformers raises many types for a broken folder
                raise LoadError(f"cannot load the tokenizer in {self.folder}: "
                                f"{one_line(e)}") from None
        return self._hf

    @staticmethod
    def maybe(folder: str) -> "Tokenizer | None":
        return Tokenizer(folder) if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None

    def render(self, messages: list[dict]) -> str:
        """The conversation in the chat template, ending with the assistant's turn to speak."""
        if not self.chat_template:
            raise RequestError("this model's tokenizer has no chat template")
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False,
                                                                      indent=indent)
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=True,
                                     **{k: v for k, v in self.specials.items() if v is not None})

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if chat:
            if not self.chat_template:
                raise RequestError("chat=True but this model's tokenizer has no chat template")
            return self.fast.encode(self.render([{"role": "user", "content": text}]),
                                    add_special_tokens=False).ids
        return self.fast.encode(text).ids

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A conversation [{"role": ..., "content": ...}, ...] in the chat template, ending with the
        assistant's turn to speak."""
        return self.fast.encode(self.render(messages), add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        text = self.fast.decode(ids, skip_special_tokens=True)
        return _clean_up(text) if self.clean_up else text


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _token_text(tok) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def _chat_template(folder: str, cfg: dict) -> str | None:
    """tokenizer_config.json's chat_template (a string, or named templates: "default"), else
    chat_template.jinja beside it, as transformers looks them up."""
    t = cfg.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if x.get("name") == "default"), None)
    if t:
        return t
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    return None


def _raise(message):
    from jinja2.exceptions import TemplateError
    raise TemplateError(message)


def _clean_up(text: str) -> str:
    """transformers' clean_up_tokenization (for tokenizers that ask for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class Detokenizer:
    """Turns a growing list of ids into text deltas, holding back what may still change.

    Held back: an incomplete UTF-8 character (decoded as U+FFFD) and any tail that could be the
    beginning of a stop string.  ``text`` is the whole text so far, cut at the first stop string.
    """

    def __init__(self, tok: Tokenizer, stop: list[str]):
        self.tok, self.stop = tok, stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token: int) -> str:
        """Append a token; return the newly safe text (may be '')."""
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        for s in self.stop:
            i = text.find(s)
            if i >= 0:
                text, self.stopped = text[:i], True
        self.text = text
        return self._release(final=self.stopped)

    def flush(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        safe = len(self.text)
        if not final:
            if self.text.endswith("\ufffd"):
                safe -= 1
            for s in self.stop:
                for n in range(min(len(s) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(s[:n]):
                        safe -= n
                        break
        piece = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return piece
