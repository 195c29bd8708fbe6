"""The FastAPI application of pf-serve: OpenAI-compatible endpoints over the engine's scheduler.

    POST /v1/chat/completions, POST /v1/completions   (stream: true -> server-sent events)
    GET  /v1/models, /health, /metrics

Every request is one ``Engine.submit`` on the shared continuous-batching scheduler (its
background thread decodes; the handlers await tokens without blocking the event loop).
Backpressure: when ``max_queue`` requests already wait for a slot the answer is 429 with
Retry-After.  A client that goes away cancels its request (its slot is freed): a streamed one
at its next token, a non-streamed one within 0.1 s; ``timeout_s`` bounds a request from arrival to
its last token (504).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from pf_engine.errors import RequestError
from pf_engine.serve.metrics import Metrics
from pf_engine.serve.protocol import APIError, Catalog, Parsed, chunk, new_id, parse, response


def build_app(engine, model_id: str, max_queue: int = 64, api_key: str | None = None,
              timeout_s: float = 600.0) -> FastAPI:
    """The app for ``engine`` (its scheduler as configured, e.g. ``engine.scheduler(slots=8)``)."""
    app = FastAPI(title="pf-serve", docs_url=None, redoc_url=None, openapi_url=None)
    catalog = Catalog(model_id, engine.bank)
    metrics = Metrics(engine.scheduler)
    app.state.engine, app.state.catalog, app.state.metrics = engine, catalog, metrics
    app.state.served = {"requests": 0, "tokens": 0, "t0": time.monotonic()}
    log = logging.getLogger("pf_engine.serve")

    def record(endpoint: str, status: str, p: Parsed | None = None, req=None, rid: str = "-") -> None:
        """Count a finished (or refused) request in the metrics and log one line for it:
        id, model id, persona kind, status, prompt and completion tokens, ms since arrival."""
        kind = req.kind if req is not None else "-"
        metrics.finished(endpoint, kind, status, req)
        prompt, done = (len(req.ids), len(req.tokens)) if req is not None else (0, 0)
        ms = 1e3 * (time.perf_counter() - req.t_submit) if req is not None else 0.0
        app.state.served["requests"] += 1
        app.state.served["tokens"] += done
        log.info("%s %s model=%s persona=%s status=%s prompt=%d completion=%d ms=%.0f", rid,
                 endpoint, p.model if p is not None else "-", kind, status, prompt, done, ms)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        err = APIError(500, f"internal error: {type(e).__name__}: {e}", None, "server_error")
        return JSONResponse(err.body(), status_code=500)

    if api_key is not None:
        app.add_middleware(KeyAuth, key=api_key)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": i, "object": "model", "created": 0,
                                            "owned_by": "pf-engine"} for i in catalog.ids()]}

    @app.get("/metrics")
    async def metrics_text():
        return PlainTextResponse(metrics.text(), media_type="text/plain; version=0.0.4")

    async def handle(request: Request, kind: str):
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise APIError(400, "body: expected a JSON object", "body") from None
        p = parse(body, kind, catalog, engine)
        sched = engine.scheduler()
        endpoint = "chat" if kind == "chat" else "completions"
        waiting = len(sched.waiting)
        if waiting >= max_queue and waiting + len(sched.running) >= sched.slots:   # it would wait
            record(endpoint, "rejected", p)
            raise APIError(429, f"the queue is full ({max_queue} requests wait for a slot); retry later",
                           None, "rate_limit_error", "queue_full", {"Retry-After": "1"})
        try:
            req = sched.submit(p.ids, p.params, p.persona)
        except RequestError as e:
            raise APIError(400, str(e), "max_tokens") from None
        deadline, rid = time.monotonic() + timeout_s, new_id(kind)
        if p.stream:
            return StreamingResponse(events(p, req, endpoint, deadline, rid),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        watch = asyncio.ensure_future(cancel_if_gone(request, req))
        try:
            out = await asyncio.wait_for(req.aresult(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            req.cancel()
            record(endpoint, "timeout", p, req, rid)
            raise APIError(504, f"the request took longer than {timeout_s:g} s", None,
                           "timeout", "timeout") from None
        except asyncio.CancelledError:             # the server is shutting down
            req.cancel()
            record(endpoint, "cancelled", p, req, rid)
            raise
        finally:
            watch.cancel()
        record(endpoint, "cancelled" if out.finish_reason == "cancelled" else "ok", p, req, rid)
        usage = dict(out.usage, total_tokens=sum(out.usage.values()))
        return response(p, rid, out.text, out.finish_reason, usage, out.gates)

    async def events(p: Parsed, req, endpoint: str, deadline: float, rid: str):
        """Server-sent events: text pieces as they are released, the final chunk (finish reason,
        gates), the usage chunk if asked, then [DONE]."""
        created = int(time.time())
        status, first = "cancelled", True
        pieces = req.atext()
        try:
            while True:
                try:
                    piece = await asyncio.wait_for(pieces.__anext__(), max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    status = "timeout"
                    yield sse({"error": APIError(504, "the request timed out", None, "timeout",
                                                 "timeout").body()["error"]})
                    return
                yield sse(chunk(p, rid, created, piece, first=first))
                first = False
            out = req.result()
            yield sse(chunk(p, rid, created, "", out.finish_reason, first=first, gates=out.gates))
            if p.include_usage:
                usage = dict(out.usage, total_tokens=sum(out.usage.values()))
                yield sse(chunk(p, rid, created, None, usage=usage))
            yield "data: [DONE]\n\n"
            status = "ok"
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            status = "error"
            yield sse({"error": APIError(500, f"internal error: {type(e).__name__}: {e}", None,
                                         "server_error").body()["error"]})
        finally:                                   # done, timed out, or the client went away
            if not req.done:
                req.cancel()
            await pieces.aclose()
            record(endpoint, status, p, req, rid)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await handle(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, "completion")

    return app


class KeyAuth:
    """Plain ASGI middleware (it leaves ``receive`` alone, so handlers still see a disconnect):
    every path but /health needs ``Authorization: Bearer <key>``."""

    def __init__(self, app, key: str):
        self.app, self.want = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.want):
                e = APIError(401, "missing or wrong API key (Authorization: Bearer ...)", None,
                             "authentication_error", "invalid_api_key")
                await JSONResponse(e.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def cancel_if_gone(request: Request, req, every_s: float = 0.1) -> None:
    """A non-streamed request whose client hangs up is cancelled (its slot freed) within
    ``every_s``; a streamed one notices at its next event instead."""
    while not req.done:
        if await request.is_disconnected():
            req.cancel()
            return
        await asyncio.sleep(every_s)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
