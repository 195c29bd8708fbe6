"""The OpenAI request and response shapes pf-serve speaks, and their validation.

A request body becomes a ``Parsed`` (token ids, SamplingParams, persona spec, stream flags) or an
``APIError`` whose JSON is OpenAI's: {"error": {"message", "type", "param", "code"}}, with the
offending field named in ``param`` and in the message.  Nothing here touches the file system: a
``model`` must be one of the catalog's ids and a ``persona`` string is parsed as weights,
"auto" or "token", never opened.
"""
from __future__ import annotations

import math
import time
import uuid
from dataclasses import dataclass

from pf_engine.errors import RequestError
from pf_engine.persona.specs import Personas
from pf_engine.sampling import SamplingParams

ROLES = ("system", "user", "assistant")
MAX_STOP = 4


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param)


class Catalog:
    """The model ids served: the bare id is the base model, ``id:<expert>`` one expert at weight
    1, ``id:auto`` the sequence router, ``id:token`` the token router."""

    def __init__(self, model_id: str, bank):
        self.base = model_id
        self.personas: dict[str, object] = {model_id: None}
        if bank is not None:
            for name in bank.expert_names:
                self.personas[f"{model_id}:{name}"] = {name: 1.0}
            if bank.router is not None or bank.token_router is not None:
                self.personas[f"{model_id}:auto"] = "auto"
            if bank.token_router is not None:
                self.personas[f"{model_id}:token"] = "token"

    def ids(self) -> list[str]:
        return list(self.personas)


@dataclass
class Parsed:
    kind: str                        # "chat" or "completion"
    model: str
    ids: list[int]
    params: SamplingParams
    persona: object
    stream: bool
    include_usage: bool


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or (not integer and not math.isfinite(v)) or not lo <= v <= hi:
        what = "an integer" if integer else "a number"
        raise bad(name, f"expected {what} in [{lo:g}, {hi:g}], got {v!r}")
    return v


def _messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "expected a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}].role", f"expected one of {', '.join(ROLES)}")
        c = m.get("content")
        if isinstance(c, list):             # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in c):
                raise bad(f"messages[{i}].content", "only text parts are supported")
            c = "".join(p["text"] for p in c)
        if not isinstance(c, str):
            raise bad(f"messages[{i}].content", "expected a string")
        out.append({"role": m["role"], "content": c})
    return out


def _prompt(body: dict, engine) -> list[int]:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                            # a batch of one
    if isinstance(p, str) and p:
        if engine.tokenizer is None:
            raise bad("prompt", "this model has no tokenizer: send token ids")
        return engine.tokenizer.hf.encode(p)
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        vocab = engine.config.vocab_size
        if not all(0 <= t < vocab for t in p):
            raise bad("prompt", f"token ids must lie in [0, {vocab})")
        return list(p)
    raise bad("prompt", "expected a non-empty string or list of token ids (one prompt: n = 1)")


OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def _defaults(engine, kind: str) -> dict:
    """Sampling fields a request leaves out: for chat the engine's chat defaults (the model's
    generation config, else CHAT_DEFAULTS: what a chat user expects from a small model), for
    completions OpenAI's (temperature 1, top_p 1).  top_k and repetition_penalty are extension
    fields, as in vLLM."""
    return engine.generation_defaults(True)[0] if kind == "chat" else OPENAI_DEFAULTS


def parse(body, kind: str, catalog: Catalog, engine) -> Parsed:
    """Validate a /v1/chat/completions (kind "chat") or /v1/completions body."""
    if not isinstance(body, dict):
        raise APIError(400, "body: expected a JSON object", "body")
    model = body.get("model")
    if not isinstance(model, str) or model not in catalog.personas:
        raise bad("model", f"unknown model {model!r}; GET /v1/models lists {', '.join(catalog.ids())}")
    persona = catalog.personas[model]
    if body.get("persona") is not None:
        if model != catalog.base:
            raise bad("persona", f"model {model!r} already selects a persona; use the bare id "
                                 f"{catalog.base!r} with a persona field")
        persona = body["persona"]
        if not isinstance(persona, (str, dict)):
            raise bad("persona", "expected a weights object, a 'name=w,...' string, 'auto' or 'token'")
        try:
            Personas(engine.bank, [persona], 1)
        except RequestError as e:
            raise bad("persona", str(e)) from None
    if _number(body, "n", 1, 1, 1, integer=True) != 1:
        raise bad("n", "only n = 1 is supported")
    if body.get("logprobs") not in (None, False, 0):
        raise bad("logprobs", "not supported")
    ctx = engine.config.max_position_embeddings
    if kind == "chat":
        if engine.tokenizer is None:
            raise bad("messages", "this model has no tokenizer")
        try:
            ids = engine.tokenizer.encode_chat(_messages(body))
        except RequestError as e:
            raise bad("messages", str(e)) from None
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    else:
        ids = _prompt(body, engine)
        limit, name = body.get("max_tokens"), "max_tokens"
    if len(ids) >= ctx:
        raise bad("messages" if kind == "chat" else "prompt",
                  f"{len(ids)} tokens; the context holds {ctx}")
    max_new = _number({name: limit}, name, min(256, ctx - len(ids)), 1, ctx, integer=True)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s for s in stop)):
        raise bad("stop", f"expected a non-empty string or a list of at most {MAX_STOP} of them")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad("seed", f"expected an integer, got {seed!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "expected true or false")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options", "expected an object")
    d = _defaults(engine, kind)
    params = SamplingParams(max_new_tokens=max_new, seed=seed, stop=stop or [],
                            temperature=_number(body, "temperature", d["temperature"], 0, 2),
                            top_p=_number(body, "top_p", d["top_p"], 1e-9, 1),
                            top_k=_number(body, "top_k", d["top_k"], 0, 1 << 20, integer=True),
                            repetition_penalty=_number(body, "repetition_penalty",
                                                       d["repetition_penalty"], 1e-3, 10))
    return Parsed(kind, model, ids, params, persona, stream, bool(opts.get("include_usage")))


def finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def response(p: Parsed, rid: str, text: str, reason: str, usage: dict, gates) -> dict:
    """The non-streamed body."""
    if p.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": finish_reason(reason), "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish_reason(reason), "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": p.model,
            "choices": [choice], "usage": usage, "persona": gates}


def chunk(p: Parsed, rid: str, created: int, piece: str | None, reason: str | None = None,
          first: bool = False, usage: dict | None = None, gates=None) -> dict:
    """One streamed event: a text piece, the final one (reason), or the usage one (no choices)."""
    if usage is not None:
        return {"id": rid, "object": "chat.completion.chunk" if p.kind == "chat" else "text_completion",
                "created": created, "model": p.model, "choices": [], "usage": usage}
    fr = None if reason is None else finish_reason(reason)
    if p.kind == "chat":
        delta = {"role": "assistant", "content": piece or ""} if first else \
            ({"content": piece} if piece else {})
        choice = {"index": 0, "delta": delta, "finish_reason": fr, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": piece or "", "finish_reason": fr, "logprobs": None}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": created, "model": p.model, "choices": [choice]}
    if reason is not None:
        out["persona"] = gates
    return out
