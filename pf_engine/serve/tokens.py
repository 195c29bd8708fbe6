"""The tokenizer endpoints tools probe, in vLLM's shapes.

    POST /tokenize    {"prompt": str, "add_special_tokens": true}            (or)
                      {"messages": [...], "add_generation_prompt": true,
                       "add_special_tokens": false}
                      -> {"tokens": [int], "count": int, "max_model_len": int}
    POST /detokenize  {"tokens": [int]} -> {"prompt": str}
    GET  /tokenizer_info -> {"tokenizer_class", "eos_token", "bos_token", "pad_token",
                             "eos_token_id", "bos_token_id", "pad_token_id", "chat_template",
                             "model_max_length"}
"""
from __future__ import annotations

from pf_engine.serve.protocol import APIError, bad, messages_of


def _flag(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise bad(name, "expected true or false")
    return v


def _tokenizer(engine):
    if engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer", None)
    return engine.tokenizer.hf


def tokenize(engine, body) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "body: expected a JSON object", "body")
    hf = _tokenizer(engine)
    if "messages" in body:
        msgs = messages_of(body)
        if not hf.chat_template:
            raise bad("messages", "this model's tokenizer has no chat template")
        text = hf.apply_chat_template(msgs, tokenize=False,
                                      add_generation_prompt=_flag(body, "add_generation_prompt",
                                                                  True))
        ids = hf.encode(text, add_special_tokens=_flag(body, "add_special_tokens", False))
    else:
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise bad("prompt", "expected a string (or send messages)")
        ids = hf.encode(prompt, add_special_tokens=_flag(body, "add_special_tokens", True))
    return {"tokens": ids, "count": len(ids),
            "max_model_len": engine.config.max_position_embeddings}


def detokenize(engine, body) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, "body: expected a JSON object", "body")
    hf, ids, vocab = _tokenizer(engine), body.get("tokens"), engine.config.vocab_size
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                            and 0 <= t < vocab for t in ids):
        raise bad("tokens", f"expected a list of token ids in [0, {vocab})")
    return {"prompt": hf.decode(ids)}


def tokenizer_info(engine) -> dict:
    hf = _tokenizer(engine)
    out = {"tokenizer_class": type(hf).__name__, "chat_template": hf.chat_template,
           "model_max_length": engine.config.max_position_embeddings}
    for name in ("eos", "bos", "pad"):
        out[f"{name}_token"] = getattr(hf, f"{name}_token")
        out[f"{name}_token_id"] = getattr(hf, f"{name}_token_id")
    return out
