"""What one request may cost the server before it is refused, with OpenAI's error JSON.

    body = await read_json(request, max_bytes)     # 413 past max_bytes (read in pieces, so a
                                                   # body without Content-Length is bounded too)
    - JSON nested deeper than MAX_DEPTH: 400
    - NaN, Infinity, or a number that overflows a float (1e999): 400 naming it

The other bounds are the server's (app.py, cli/serve.py): prompts x best_of per request
(protocol.MAX_CHOICES), a deadline per request (--timeout), concurrent connections
(--max-connections: 503 past it), idle keep-alive connections closed after --keep-alive-s.
"""
from __future__ import annotations

import json
import math

from pf_engine.serve.protocol import APIError

MAX_BODY_BYTES = 8 << 20     # 8 MiB: 64 prompts of 2048 token ids are about 1 MiB
MAX_DEPTH = 32               # arrays and objects inside each other


def _refuse_constant(name: str):
    raise APIError(400, f"body: non-finite number {name} (JSON numbers must be finite)", "body")


def _finite_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):
        raise APIError(400, f"body: number {text[:32]} overflows a float", "body")
    return v


def depth(obj) -> int:
    """How deep arrays and objects nest in ``obj`` (0 for a scalar); iterative."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (list, dict)):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (o.values() if isinstance(o, dict) else o))
    return deepest


def parse_json(raw: bytes, max_depth: int = MAX_DEPTH):
    """Bytes -> the JSON value, or an APIError (400) that says what is wrong."""
    try:
        obj = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "body: expected a JSON object", "body") from None
    except RecursionError:                       # nested past the parser's own limit
        raise _too_deep(max_depth) from None
    if depth(obj) > max_depth:
        raise _too_deep(max_depth)
    return obj


def _too_deep(max_depth: int) -> APIError:
    return APIError(400, f"body: JSON nested deeper than {max_depth} levels", "body")


async def read_json(request, max_bytes: int = MAX_BODY_BYTES, max_depth: int = MAX_DEPTH):
    """The request's body as JSON, at most ``max_bytes`` read (413 past it)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    parts, size = [], 0
    async for piece in request.stream():
        size += len(piece)
        if size > max_bytes:
            raise _too_large(max_bytes)
        parts.append(piece)
    return parse_json(b"".join(parts), max_depth)


def _too_large(max_bytes: int) -> APIError:
    return APIError(413, f"body: larger than {max_bytes} bytes (pf-serve --max-body-mb)", "body",
                    "invalid_request_error", "body_too_large")
