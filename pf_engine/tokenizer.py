"""Text <-> token ids, the chat template, and incremental detokenisation for streaming.

Wraps the fast tokenizer saved in an HF folder (tokenizer.json + tokenizer_config.json, whose
chat template transformers applies).  A model folder without a tokenizer still serves token ids.
"""
from __future__ import annotations

import os

from pf_engine.model.checks import one_line
from pf_engine.errors import LoadError, RequestError


class Tokenizer:
    def __init__(self, folder: str):
        if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            raise LoadError(f"no tokenizer.json in {folder}")
        from transformers import AutoTokenizer
        try:
            self.hf = AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # transformers raises many types for a broken folder
            raise LoadError(f"cannot load the tokenizer in {folder}: {one_line(e)}") from None
        self.eos_token_id = self.hf.eos_token_id

    @staticmethod
    def maybe(folder: str) -> "Tokenizer | None":
        return Tokenizer(folder) if os.path.isfile(os.path.join(folder, "tokenizer.json")) else None

    def encode(self, text: str, chat: bool = False) -> list[int]:
        if chat:
            if not self.hf.chat_template:
                raise RequestError("chat=True but this model's tokenizer has no chat template")
            text = self.hf.apply_chat_template([{"role": "user", "content": text}],
                                               add_generation_prompt=True, tokenize=False)
            return self.hf.encode(text, add_special_tokens=False)
        return self.hf.encode(text)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """A conversation [{"role": ..., "content": ...}, ...] in the chat template, ending with the
        assistant's turn to speak."""
        if not self.hf.chat_template:
            raise RequestError("this model's tokenizer has no chat template")
        text = self.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)


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
