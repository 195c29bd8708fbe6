"""Structured output: OpenAI's ``response_format`` as a grammar whose token mask constrains
sampling, compiled and matched by llguidance (the grammar library vLLM, SGLang and llama.cpp
use; no JSON parser of ours in the sampler).

    response_format                                  the reply is held to
    None, {"type": "text"}                           nothing
    {"type": "json_object"}                          a JSON object
    {"type": "json_schema", "json_schema":           that JSON schema.  strict or not, the mask
        {"name": N, "schema": S, "strict": bool}}    holds the reply to it (as vLLM does)

JSON is compact (no whitespace between items: ``whitespace_flexible`` off), so a model cannot
pad a reply with spaces until its token budget runs out.

    rf = check_response_format(value)      normalised dict or None; RequestError (one line)
    g = Grammars.of(engine).compile(rf)    the grammar, compiled once per schema; a schema the
                                           library cannot compile: RequestError naming it
    m = g.matcher()                        one request's state:
    m.banned()                             bool [V]: the tokens the grammar does not allow next
    m.consume(tok) -> bool                 False: the token broke the grammar (never sampled)
    m.done                                 the reply is complete (only EOS may follow)

The scheduler masks each grammar row of a batch's logits in place before sampling (rows without
a grammar are untouched) and feeds each sampled token to its row's matcher.
"""
from __future__ import annotations

import json
import threading

import numpy as np
import torch

from pf_engine.errors import RequestError

JSON_OPTIONS = {"whitespace_flexible": False}


def check_response_format(rf) -> dict | None:
    """``rf`` checked and normalised, in OpenAI's shape (so checking twice is harmless):
    {"type": "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema",
    "strict"}}; None for plain text."""
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise RequestError(f"response_format={rf!r}: expected an object with a type "
                           "(text, json_object or json_schema)")
    kind = rf["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": kind}
    if kind != "json_schema":
        raise RequestError(f"response_format.type={kind!r}: "
                           "expected text, json_object or json_schema")
    js = rf.get("json_schema")
    if not isinstance(js, dict) or not isinstance(js.get("name"), str) or not js["name"]:
        raise RequestError("response_format.json_schema: "
                           "expected an object with a name and a schema")
    schema = js.get("schema", {})
    if not isinstance(schema, dict):
        raise RequestError(f"response_format.json_schema {js['name']!r}: schema must be a JSON "
                           f"object, got {type(schema).__name__}")
    strict = js.get("strict", False)
    if strict is not None and not isinstance(strict, bool):
        raise RequestError(f"response_format.json_schema {js['name']!r}: "
                           "strict must be true or false")
    return {"type": kind,
            "json_schema": {"name": js["name"], "schema": schema, "strict": bool(strict)}}


def _schema(rf: dict) -> tuple[str, dict]:
    """(name, JSON schema) of a normalised response_format."""
    if rf["type"] == "json_object":
        return "json_object", {"type": "object"}
    return rf["json_schema"]["name"], rf["json_schema"]["schema"]


class Grammar:
    def __init__(self, grammars: "Grammars", text: str):
        self._g, self.text = grammars, text

    def matcher(self) -> "Matcher":
        return Matcher(self._g, self.text)


class Matcher:
    """One request's position in its grammar (llguidance.LLMatcher)."""

    def __init__(self, grammars: "Grammars", text: str):
        import llguidance
        self._m = llguidance.LLMatcher(grammars.tokenizer, text, log_level=0)
        self._words = np.zeros(grammars.words, dtype=np.int32)
        self.vocab = grammars.vocab

    def banned(self) -> np.ndarray:
        """bool [vocab]: the tokens the grammar does not allow next."""
        self._m.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)
        np.invert(self._words, out=self._words)
        return np.unpackbits(self._words.view(np.uint8), count=self.vocab,
                             bitorder="little").view(bool)

    def consume(self, tok: int) -> bool:
        return bool(self._m.consume_token(tok))

    @property
    def done(self) -> bool:
        return bool(self._m.is_stopped())

    @property
    def error(self) -> str:
        return self._m.get_error()


class Grammars:
    """An engine's llguidance tokenizer (built once, ~1 s) and its compiled grammars."""

    _lock = threading.Lock()

    def __init__(self, engine):
        try:
            import llguidance
        except ImportError as e:
            raise RequestError(f"response_format needs the llguidance package ({e}); pip install "
                               "llguidance") from None
        tok = engine.tokenizer
        if tok is None:
            raise RequestError("response_format needs the model's tokenizer; this model has none")
        self.vocab = engine.config.vocab_size
        self.words = (self.vocab + 31) // 32
        self.tokenizer = llguidance.LLTokenizer(tok.fast.to_str(), n_vocab=self.vocab,
                                                eos_token=sorted(engine.eos_ids))
        self._cache: dict[str, Grammar] = {}

    @classmethod
    def of(cls, engine) -> "Grammars":
        with cls._lock:
            g = getattr(engine, "_grammars", None)
            if g is None:
                g = engine._grammars = cls(engine)
            return g

    def compile(self, rf: dict) -> Grammar:
        """The grammar of a normalised response_format; RequestError naming a schema the library
        cannot compile."""
        import llguidance
        name, schema = _schema(rf)
        key = json.dumps(schema, sort_keys=True)
        g = self._cache.get(key)
        if g is not None:
            return g
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
            err = llguidance.LLMatcher.validate_grammar(text, self.tokenizer)
        except (ValueError, TypeError) as e:
            err = str(e)
        if err:
            raise RequestError(f"response_format.json_schema {name!r} cannot be compiled: "
                               f"{err.splitlines()[0]}")
        g = self._cache[key] = Grammar(self, text)
        return g


def mask_rows(logits: torch.Tensor, rows: list[int], matchers: list[Matcher],
              use_torch: bool | None = None) -> None:
    """logits [n, V] (V >= vocab): rows[i] keeps only the tokens matchers[i] allows (the others,
    and ids past the vocabulary, -inf), in place.  On the CPU through a numpy view of each row
    (torch's indexing ops cost ~0.7 ms a token here, more than the grammar); on a GPU
    (``use_torch``) with one host-to-device copy of all the masks."""
    if not rows:
        return
    V = logits.shape[1]
    banned = [m.banned() for m in matchers]
    if use_torch is None:
        use_torch = logits.device.type != "cpu"
    if not use_torch:
        for b, ban in zip(rows, banned):
            row = logits[b].numpy()
            np.putmask(row[:ban.shape[0]], ban, -np.inf)
            row[ban.shape[0]:] = -np.inf
        return
    full = np.ones((len(rows), V), dtype=bool)
    for i, ban in enumerate(banned):
        full[i, :ban.shape[0]] = ban
    mask = torch.from_numpy(full).to(logits.device, non_blocking=True)
    idx = torch.tensor(rows, device=logits.device)
    logits[idx] = logits[idx].masked_fill(mask, float("-inf"))
