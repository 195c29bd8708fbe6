"""The OpenAI response bodies pf-serve writes: choices, streamed chunks, and logprobs.

Logprobs (generation/scoring.py: the model's log-softmax, before temperature and top-p) in
OpenAI's two
shapes:

    completions  {"tokens": [str], "token_logprobs": [float | None],
                  "top_logprobs": [{str: float} | None], "text_offset": [int]}
    chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
                  "logprob", "bytes"}]}]}

A token's string is its piece of the decoded text (decoded in context, so the pieces of a
completion add up to its text and ``text_offset`` indexes the returned text); the keys of a
completion's ``top_logprobs`` are the tokens decoded alone, and, as in vLLM, the chosen token
is among them even when it is not in the top n.  With echo, the prompt's tokens come first and
the first has null logprob and top_logprobs.
"""
from __future__ import annotations

import time

CONTEXT = 6                # tokens decoded before a token to spell it in context


def finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


def spell(tokenizer, ids: list[int]) -> list[str]:
    """Each token's piece of the decoded text: decode(context + token) minus decode(context)."""
    dec = tokenizer.hf.decode
    out = []
    for i in range(len(ids)):
        ctx = ids[max(0, i - CONTEXT):i]
        before, full = dec(ctx, skip_special_tokens=False), dec(ctx + [ids[i]],
                                                                skip_special_tokens=False)
        out.append(full[len(before):] if full.startswith(before) else full)
    return out


def _alone(tokenizer, t: int) -> str:
    return tokenizer.hf.decode([t], skip_special_tokens=False)


def completion_logprobs(tokenizer, ids: list[int], entries: list, offset: int = 0) -> dict:
    """ids [n] and their Logprob entries [n] (None: no logprob, the echoed first token) -> the
    completions shape; offsets start at ``offset`` in the returned text."""
    pieces = spell(tokenizer, ids)
    offsets = []
    for p in pieces:
        offsets.append(offset)
        offset += len(p)
    tops = []
    for piece, e in zip(pieces, entries):
        if e is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for t, lp in e.top + [(e.token_id, e.logprob)]:   # two tokens may spell alike: the
            top.setdefault(_alone(tokenizer, t), lp)        # more likely one keeps the key
        tops.append(top)
    return {"tokens": pieces, "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": tops, "text_offset": offsets}


def merge_completion_logprobs(a: dict, b: dict) -> dict:
    return {k: a[k] + b[k] for k in a}


def chat_logprobs(tokenizer, entries: list) -> dict:
    """Logprob entries of generated tokens -> the chat shape."""
    pieces = spell(tokenizer, [e.token_id for e in entries])

    def one(token: str, lp: float) -> dict:
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8"))}
    return {"content": [dict(one(piece, e.logprob),
                             top_logprobs=[one(_alone(tokenizer, t), lp) for t, lp in e.top])
                        for piece, e in zip(pieces, entries)]}


def choice_body(kind: str, index: int, text: str, reason: str, logprobs: dict | None,
                gates) -> dict:
    """One choice of a non-streamed body."""
    if kind == "chat":
        return {"index": index, "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason(reason), "logprobs": logprobs, "persona": gates}
    return {"index": index, "text": text, "finish_reason": finish_reason(reason),
            "logprobs": logprobs, "persona": gates}


def response(p, rid: str, choices: list[dict], usage: dict) -> dict:
    """The non-streamed body; ``persona`` (top level) is the first choice's gates."""
    obj = "chat.completion" if p.kind == "chat" else "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": p.model,
            "choices": choices, "usage": usage, "persona": choices[0]["persona"]}


def chunk(p, rid: str, created: int, piece: str | None, reason: str | None = None,
          first: bool = False, usage: dict | None = None, gates=None, index: int = 0,
          logprobs: dict | None = None) -> dict:
    """One streamed event of choice ``index``: a text piece (with the logprobs of the tokens it
    brings), the final one (reason, gates), or the usage one (no choices)."""
    obj = "chat.completion.chunk" if p.kind == "chat" else "text_completion"
    if usage is not None:
        return {"id": rid, "object": obj, "created": created, "model": p.model, "choices": [],
                "usage": usage}
    fr = None if reason is None else finish_reason(reason)
    if p.kind == "chat":
        delta = {"role": "assistant", "content": piece or ""} if first else \
            ({"content": piece} if piece else {})
        choice = {"index": index, "delta": delta, "finish_reason": fr, "logprobs": logprobs}
    else:
        choice = {"index": index, "text": piece or "", "finish_reason": fr, "logprobs": logprobs}
    out = {"id": rid, "object": obj, "created": created, "model": p.model, "choices": [choice]}
    if reason is not None:
        out["persona"] = gates
    return out
