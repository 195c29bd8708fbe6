"""The OpenAI request and response shapes pf-serve speaks, and their validation.

A request body becomes a ``Parsed`` (token ids, SamplingParams, persona spec, stream flags) or an
``APIError`` whose JSON is OpenAI's: {"error": {"message", "type", "param", "code"}}, with the
offending field named in ``param`` and in the message.  Nothing here touches the file system: a
``model`` must be one of the catalog's ids and a ``persona`` string is parsed as weights,
"auto" or "token", never opened.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import uuid
from dataclasses import dataclass

from pf_engine.errors import RequestError
from pf_engine.serve import aliases
from pf_engine.persona.specs import Personas
from pf_engine.generation.sampling import MAX_DRAFT, MAX_LOGPROBS, SamplingParams
from pf_engine.generation.structured import Grammars, check_response_format

ROLES = ("system", "user", "assistant")
MAX_STOP = 4
MAX_PROMPTS = 64           # prompts in one completions request
MAX_CHOICES = 128          # prompts x best_of candidates in one request


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None, headers=None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (
            status, message, param, type_, code)
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param)


def model_id(folder: str) -> str:
    """The id clients name by default: the model folder's name, lowercased, URL-safe."""
    name = os.path.basename(os.path.normpath(folder)).lower()
    return re.sub(r"[^a-z0-9._-]+", "-", name).strip("-") or "model"


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
    """A checked request: one or more prompts, each answered by ``n`` choices (the best ``n`` of
    ``best_of`` candidates); candidate i of every prompt is sampled with seed + i."""
    kind: str                        # "chat" or "completion"
    model: str
    prompts: list[list[int]]         # token ids; chat: one
    texts: list[str | None]          # each prompt as text, for echo (None: not asked)
    params: SamplingParams
    persona: object                  # the spec as given (logged)
    personas: Personas               # the spec checked, one row (Personas.select copies it)
    stream: bool
    include_usage: bool
    n: int = 1
    best_of: int = 1
    echo: bool = False
    logprobs: int | None = None      # top logprobs per position (None: no logprobs)
    score_only: bool = False         # max_tokens 0: score the prompts, generate nothing

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    def candidate_params(self, i: int) -> SamplingParams:
        """Candidate i of a prompt: seed + i when a seed is given (SamplingParams.for_request);
        logprobs kept for ranking when best_of > n."""
        q = self.params.for_request(i)
        if self.best_of > self.n and q.logprobs is None:
            q = dataclasses.replace(q, logprobs=0)
        return q


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    v = body.get(name, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if not ok or isinstance(v, bool) or (not integer and not math.isfinite(v)) or not lo <= v <= hi:
        what = "an integer" if integer else "a number"
        raise bad(name, f"expected {what} in [{lo:g}, {hi:g}], got {v!r}")
    return v


def messages_of(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "expected a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad(f"messages[{i}].role", f"expected one of {', '.join(ROLES)}")
        c = m.get("content")
        if isinstance(c, list):             # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str)
                       for p in c):
                raise bad(f"messages[{i}].content", "only text parts are supported")
            c = "".join(p["text"] for p in c)
        if not isinstance(c, str):
            raise bad(f"messages[{i}].content", "expected a string")
        out.append({"role": m["role"], "content": c})
    return out


def _is_ids(p) -> bool:
    return isinstance(p, list) and bool(p) and all(isinstance(t, int) and not isinstance(t, bool)
                                                   for t in p)


def _prompts(body: dict, engine) -> list[tuple[list[int], str | None]]:
    """OpenAI's four prompt forms: a string, a list of strings, a list of token ids, a list of
    token-id lists -> [(token ids, the text as given or None)], in order."""
    p = body.get("prompt")
    if isinstance(p, str) or _is_ids(p):
        p = [p]
    if not isinstance(p, list) or not p:
        raise bad("prompt", "expected a non-empty string, a list of strings, a list of token ids "
                            "or a list of token-id lists")
    if len(p) > MAX_PROMPTS:
        raise bad("prompt", f"{len(p)} prompts; at most {MAX_PROMPTS} per request")
    vocab, out = engine.config.vocab_size, []
    for i, one in enumerate(p):
        where = "prompt" if len(p) == 1 else f"prompt[{i}]"
        if isinstance(one, str) and one:
            if engine.tokenizer is None:
                raise bad(where, "this model has no tokenizer: send token ids")
            out.append((engine.tokenizer.hf.encode(one), one))
        elif _is_ids(one):
            if not all(0 <= t < vocab for t in one):
                raise bad(where, f"token ids must lie in [0, {vocab})")
            out.append((list(one), None))
        else:
            raise bad(where, "expected a non-empty string or a non-empty list of token ids")
    return out


def _logprobs(body: dict, kind: str) -> int | None:
    """completions: ``logprobs`` 0..20 (the top ones per position); chat: ``logprobs`` true with
    ``top_logprobs`` 0..20.  None: no logprobs."""
    if kind == "completion":
        return _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    on = body.get("logprobs")
    if on is not None and not isinstance(on, bool):
        raise bad("logprobs", f"expected true or false, got {on!r}")
    top = _number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
    if top is not None and not on:
        raise bad("top_logprobs", "needs logprobs: true")
    return (top or 0) if on else None


OPENAI_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


def _defaults(engine, kind: str) -> dict:
    """Sampling fields a request leaves out: for chat the engine's chat defaults (the model's
    generation config, else CHAT_DEFAULTS: what a chat user expects from a small model), for
    completions OpenAI's (temperature 1, top_p 1).  top_k and repetition_penalty are extension
    fields, as in vLLM."""
    return engine.generation_defaults(True)[0] if kind == "chat" else OPENAI_DEFAULTS


def _persona(body: dict, catalog: Catalog, engine) -> tuple[str, object, Personas]:
    """(model id, persona spec, the spec checked as a one-row Personas): the id names one, or
    the bare id and a ``persona`` field, or llama.cpp's ``lora`` / LoRAX's ``merged_adapters``
    (aliases.py)."""
    model = body.get("model")
    if not isinstance(model, str) or model not in catalog.personas:
        raise bad("model", f"unknown model {model!r}; "
                           f"GET /v1/models lists {', '.join(catalog.ids())}")
    persona = catalog.personas[model]
    try:
        alias = aliases.persona(body, list(engine.bank.expert_names) if engine.bank else [])
    except aliases.AliasError as e:
        raise bad(e.field, str(e)) from None
    if alias is not None:
        field, persona = alias
        if body.get("persona") is not None or model != catalog.base:
            raise bad(field, f"the request already selects a persona (model {model!r} or a persona "
                             f"field); use the bare id {catalog.base!r} with {field} alone")
    elif body.get("persona") is not None:
        if model != catalog.base:
            raise bad("persona", f"model {model!r} already selects a persona; use the bare id "
                                 f"{catalog.base!r} with a persona field")
        persona = body["persona"]
        if not isinstance(persona, (str, dict)):
            raise bad("persona", "expected a weights object, a 'name=w,...' string, "
                                 "'auto' or 'token'")
    try:
        personas = Personas(engine.bank, [persona], 1)
    except RequestError as e:
        raise bad("persona", str(e)) from None
    return model, persona, personas


def _inputs(body: dict, kind: str, engine):
    """([(prompt ids, text)], echo, the max-tokens value and its field name)."""
    if kind == "chat":
        if engine.tokenizer is None:
            raise bad("messages", "this model has no tokenizer")
        try:
            prompts = [(engine.tokenizer.encode_chat(messages_of(body)), None)]
        except RequestError as e:
            raise bad("messages", str(e)) from None
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        return prompts, False, body.get(name), name
    if body.get("suffix") is not None:
        raise bad("suffix", "not supported (no insertion model)")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise bad("echo", "expected true or false")
    return _prompts(body, engine), echo, body.get("max_tokens"), "max_tokens"


def _max_new(limit, name: str, kind: str, longest: int, ctx: int) -> int:
    """New tokens per choice: completions may ask 0 (score the prompt alone); the default is
    what fits, at most 256.  A prompt alone may fill the context only to be scored."""
    if longest >= ctx + (kind != "chat"):
        raise bad("messages" if kind == "chat" else "prompt",
                  f"{longest} tokens; the context holds {ctx}")
    low = 0 if kind == "completion" else 1
    max_new = _number({name: limit}, name, max(low, min(256, ctx - longest)), low, ctx,
                      integer=True)
    if max_new and longest >= ctx:
        raise bad("prompt", f"{longest} tokens fill the context ({ctx}): only max_tokens 0 "
                            "(scoring) fits")
    return max_new


def _sampling(body: dict, kind: str, engine, max_new: int, logprobs) -> SamplingParams:
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                             or not all(isinstance(s, str) and s for s in stop)):
        raise bad("stop", f"expected a non-empty string or a list of at most {MAX_STOP} of them")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise bad("seed", f"expected an integer, got {seed!r}")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos", f"expected true or false, got {ignore_eos!r}")
    min_tokens = _number(body, "min_tokens", 0, 0, max(1, max_new), integer=True)
    spec = _number(body, "speculative_tokens", 0, 0, MAX_DRAFT, integer=True)
    d = _defaults(engine, kind)
    return SamplingParams(max_new_tokens=max(1, max_new), seed=seed, stop=stop or [],
                          min_tokens=min_tokens, ignore_eos=ignore_eos, speculative_tokens=spec,
                          logprobs=logprobs, response_format=_response_format(body, engine),
                          temperature=_number(body, "temperature", d["temperature"], 0, 2),
                          top_p=_number(body, "top_p", d["top_p"], 1e-9, 1),
                          top_k=_number(body, "top_k", d["top_k"], 0, 1 << 20, integer=True),
                          repetition_penalty=_number(body, "repetition_penalty",
                                                     d["repetition_penalty"], 1e-3, 10))


def _response_format(body: dict, engine) -> dict | None:
    """``response_format`` normalised (generation/structured.py), its schema compiled now:
    a schema the
    grammar library cannot compile is a 400 naming it."""
    try:
        rf = check_response_format(body.get("response_format"))
        if rf is not None:
            Grammars.of(engine).compile(rf)
    except RequestError as e:
        raise APIError(400, str(e), "response_format") from None
    return rf


def parse(body, kind: str, catalog: Catalog, engine) -> Parsed:
    """Validate a /v1/chat/completions (kind "chat") or /v1/completions body."""
    if not isinstance(body, dict):
        raise APIError(400, "body: expected a JSON object", "body")
    model, persona, personas = _persona(body, catalog, engine)
    n = _number(body, "n", 1, 1, MAX_CHOICES, integer=True)
    best_of = n if kind == "chat" else _number(body, "best_of", n, 1, MAX_CHOICES, integer=True)
    if best_of < n:
        raise bad("best_of", f"best_of {best_of} is less than n {n}")
    logprobs = _logprobs(body, kind)
    prompts, echo, limit, name = _inputs(body, kind, engine)
    if len(prompts) * best_of > MAX_CHOICES:
        raise bad("n", f"{len(prompts)} prompts x {best_of} choices; at most {MAX_CHOICES} per "
                       "request")
    max_new = _max_new(limit, name, kind, max(len(ids) for ids, _ in prompts),
                       engine.config.max_position_embeddings)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad("stream", "expected true or false")
    if best_of > n and stream:
        raise bad("best_of", "best_of > n cannot be streamed")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad("stream_options", "expected an object")
    params = _sampling(body, kind, engine, max_new, logprobs)
    if (echo or logprobs is not None) and engine.tokenizer is None:
        raise bad("echo" if echo else "logprobs", "this model has no tokenizer to spell tokens")
    texts = [(t if t is not None else engine.tokenizer.decode(ids)) if echo else None
             for ids, t in prompts]
    return Parsed(kind, model, [ids for ids, _ in prompts], texts, params, persona, personas,
                  stream,
                  bool(opts.get("include_usage")), n, best_of, echo, logprobs,
                  score_only=not max_new)


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
