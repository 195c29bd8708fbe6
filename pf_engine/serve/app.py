"""The FastAPI application of pf-serve: OpenAI-compatible endpoints over the engine's scheduler.

    POST /v1/chat/completions, POST /v1/completions   (stream: true -> server-sent events)
    POST /tokenize, /detokenize; GET /tokenizer_info  (tokens.py, vLLM's shapes)
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
from dataclasses import dataclass

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from pf_engine.errors import RequestError
from pf_engine.serve.metrics import Metrics
from pf_engine.serve import adapters, aliases, tokens
from pf_engine.serve.choices import Call
from pf_engine.serve.limits import MAX_BODY_BYTES, read_json
from pf_engine.serve.protocol import APIError, Catalog, new_id, parse

LOG = logging.getLogger("pf_engine.serve")


class Server:
    """What the handlers share: the engine, its model ids (Catalog), the metrics and the limits
    (``max_queue`` requests waiting for a slot, ``timeout_s`` from arrival to the last token,
    ``max_body`` bytes of a request body)."""

    def __init__(self, engine, model_id: str, max_queue: int, timeout_s: float, max_body: int):
        self.engine, self.catalog = engine, Catalog(model_id, engine.bank)
        self.metrics = Metrics(engine.scheduler, lambda: engine.bank)
        self.max_queue, self.timeout_s, self.max_body = max_queue, timeout_s, max_body
        self.served = {"requests": 0, "tokens": 0, "t0": time.monotonic()}
        self.live: set[Call] = set()          # admitted calls: their slots are reserved
        self.metrics.reserved = self.reserved
        self.changes = adapters.Changes()     # run-time bank changes (adapters.py)

    # what the routes ask (a Ray Serve ingress answers the same from its replicas) -----------
    async def model_ids(self) -> list[str]:
        return self.catalog.ids()

    async def tokens(self, what: str, body) -> dict:
        """/tokenize, /detokenize (``body``: the request's JSON) or /tokenizer_info (tokens.py)."""
        if what == "tokenizer_info":
            return tokens.tokenizer_info(self.engine)
        return getattr(tokens, what)(self.engine, body)

    async def metrics_text(self) -> str:
        return self.metrics.text()

    async def change_bank(self, body, load: bool) -> dict:
        """/v1/load_lora_adapter (``load``) or /v1/unload_lora_adapter (adapters.py)."""
        return await adapters.change(self, body, load)

    def record(self, endpoint: str, status: str, call: Call, rid: str, t0: float) -> None:
        """Count a finished (or refused) request in the metrics and log one line for it:
        id, model id, persona kind, status, prompt and completion tokens, ms since arrival."""
        kind, reqs = call.personas.kinds[0], call.all_reqs
        self.metrics.finished(endpoint, kind, status, reqs, call.p.model)
        prompt = sum(len(ids) for ids in call.p.prompts)
        done = sum(len(r.tokens) for r in reqs)
        ms = 1e3 * (time.perf_counter() - t0)
        self.served["requests"] += 1
        self.served["tokens"] += done
        LOG.info("%s %s model=%s persona=%s status=%s prompt=%d completion=%d ms=%.0f", rid,
                 endpoint, call.p.model, kind, status, prompt, done, ms)

    def reserved(self) -> int:
        """Slots reserved by admitted calls that still run or wait (or are being prepared)."""
        self.live = {c for c in self.live if not c.finished}
        return sum(c.slots_needed for c in self.live)

    def admit(self, call: Call, endpoint: str, t0: float) -> None:
        """Reserve ``call``'s slots, or 429 when the engine's slots and ``max_queue`` waiting
        places are all taken (by the reservations, or by the scheduler's requests when other
        clients submitted more).  Called before any await of the handler, so a
        burst's handlers count each other however they interleave on the event loop; a call
        holds its reservation until it is ``finished`` (its requests done, or closed before
        submitting)."""
        sched = self.engine.scheduler()
        k = call.slots_needed
        if not k:
            return
        others = len(sched.waiting) + len(sched.running)      # HTTP's and other clients' requests
        if max(self.reserved(), others) + k > sched.slots + self.max_queue:
            self.record(endpoint, "rejected", call, "-", t0)
            raise APIError(429, f"the queue is full ({self.max_queue} requests wait for a slot); "
                           "retry later", None, "rate_limit_error", "queue_full",
                           {"Retry-After": "1"})
        self.live.add(call)

    async def complete(self, request: Request, kind: str):
        """A /v1/chat/completions (kind "chat") or /v1/completions request, start to end."""
        st = await self.start(await read_json(request, self.max_body), kind)
        if st.stream:
            return StreamingResponse(self.events(st), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self.result(st, request.is_disconnected)

    async def start(self, body, kind: str) -> "Started":
        """Parse a completion request's JSON body, reserve its slots, prepare and submit it
        (APIError for a bad or refused one): what ``result`` or ``events`` then answer.  The
        HTTP handler and a Ray Serve replica (ray_serve.py) both start here."""
        t0 = time.perf_counter()
        await self.changes.wait()             # no await from here to admit: a change drains us
        p = parse(body, kind, self.catalog, self.engine)
        call = Call(self.engine, p)
        endpoint = "chat" if kind == "chat" else "completions"
        self.admit(call, endpoint, t0)
        deadline, rid = time.monotonic() + self.timeout_s, new_id(kind)
        try:
            await asyncio.wait_for(call.prepare(), max(0.0, deadline - time.monotonic()))
            call.submit()
        except BaseException as e:             # its reservation ends with it
            call.closed = True
            if isinstance(e, RequestError):
                raise APIError(400, str(e), "prompt") from None
            raise
        return Started(call, endpoint, deadline, rid, t0, p.stream)

    async def result(self, st: "Started", gone=None) -> dict:
        """The non-streamed body of a started call; ``gone`` (an async () -> bool, the client
        hung up) cancels it, as does this task's cancellation; 504 past its deadline."""
        call, endpoint, rid, t0 = st.call, st.endpoint, st.rid, st.t0
        watch = asyncio.ensure_future(cancel_if_gone(gone, call)) if gone else None
        try:
            outs = await asyncio.wait_for(call.results(),
                                          max(0.0, st.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            call.cancel()
            self.record(endpoint, "timeout", call, rid, t0)
            raise APIError(504, f"the request took longer than {self.timeout_s:g} s", None,
                           "timeout", "timeout") from None
        except asyncio.CancelledError:             # shutting down, or the caller went away
            call.cancel()
            self.record(endpoint, "cancelled", call, rid, t0)
            raise
        finally:
            if watch is not None:
                watch.cancel()
        cancelled = any(o.finish_reason == "cancelled" for os_ in outs for o in os_)
        self.record(endpoint, "cancelled" if cancelled else "ok", call, rid, t0)
        return call.body(rid, outs)

    async def events(self, st: "Started"):
        """Server-sent events of a started call: Call.events' chunks, then [DONE]; a timeout
        or an error is reported in the stream (the status line is already sent)."""
        call, endpoint, rid, t0 = st.call, st.endpoint, st.rid, st.t0
        status = "cancelled"
        gen = call.events(rid, st.deadline)
        try:
            async for obj in gen:
                yield sse(obj)
            yield "data: [DONE]\n\n"
            status = "ok"
        except asyncio.TimeoutError:
            status = "timeout"
            yield sse({"error": APIError(504, "the request timed out", None, "timeout",
                                         "timeout").body()["error"]})
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            status = "error"
            yield sse({"error": APIError(500, f"internal error: {type(e).__name__}: {e}", None,
                                         "server_error").body()["error"]})
        finally:                                   # done, timed out, or the client went away
            call.cancel()
            await gen.aclose()
            self.record(endpoint, status, call, rid, t0)


@dataclass
class Started:
    """A submitted completion call (Server.start) and what answering it needs."""
    call: Call
    endpoint: str
    deadline: float
    rid: str
    t0: float
    stream: bool


# The routes: module-level handlers reading the app's Server -----------------------------------
routes = APIRouter()


def server(request: Request) -> Server:
    return request.app.state.server


@routes.get("/health")
async def health():
    return {"status": "ok"}


@routes.get("/v1/models")
async def models(request: Request):
    ids = await server(request).model_ids()
    return {"object": "list", "data": [{"id": i, "object": "model", "created": 0,
                                        "owned_by": "pf-engine"} for i in ids]}


@routes.get("/lora-adapters")
async def lora_adapters(request: Request):
    """llama.cpp server's listing: the ids its clients' ``lora`` field names (aliases.py)."""
    return aliases.adapters(await server(request).model_ids())


@routes.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request):
    s = server(request)
    return await s.change_bank(await read_json(request, s.max_body), True)


@routes.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request):
    s = server(request)
    return await s.change_bank(await read_json(request, s.max_body), False)


@routes.post("/tokenize")
async def tokenize_route(request: Request):
    s = server(request)
    return await s.tokens("tokenize", await read_json(request, s.max_body))


@routes.post("/detokenize")
async def detokenize_route(request: Request):
    s = server(request)
    return await s.tokens("detokenize", await read_json(request, s.max_body))


@routes.get("/tokenizer_info")
async def tokenizer_info_route(request: Request):
    return await server(request).tokens("tokenizer_info", None)


@routes.get("/metrics")
async def metrics_text(request: Request):
    return PlainTextResponse(await server(request).metrics_text(),
                             media_type="text/plain; version=0.0.4")


@routes.post("/v1/chat/completions")
async def chat(request: Request):
    return await server(request).complete(request, "chat")


@routes.post("/v1/completions")
async def completions(request: Request):
    return await server(request).complete(request, "completion")


async def api_error(_, e: APIError):
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def internal_error(_, e: Exception):
    err = APIError(500, f"internal error: {type(e).__name__}: {e}", None, "server_error")
    return JSONResponse(err.body(), status_code=500)


def build_app(engine, model_id: str, max_queue: int = 64, api_key: str | None = None,
              timeout_s: float = 600.0, max_body: int = MAX_BODY_BYTES) -> FastAPI:
    """The app for ``engine`` (its scheduler as configured, e.g.
    ``engine.new_scheduler(slots=8)``)."""
    s = Server(engine, model_id, max_queue, timeout_s, max_body)
    app = app_for(s, api_key)
    app.state.engine, app.state.catalog, app.state.metrics = engine, s.catalog, s.metrics
    app.state.served = s.served
    return app


def app_for(server_, api_key: str | None = None) -> FastAPI:
    """pf-serve's routes, errors and key check over ``server_``: a Server, or anything answering
    its route methods (model_ids, tokens, metrics_text, change_bank, complete) and holding
    ``max_body``, as the Ray Serve ingress does (ray_serve.py)."""
    app = FastAPI(title="pf-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server_
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(Exception, internal_error)
    if api_key is not None:
        app.add_middleware(KeyAuth, key=api_key)
    app.include_router(routes)
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


async def cancel_if_gone(gone, call, every_s: float = 0.1) -> None:
    """A non-streamed request whose client hangs up (``gone()``: the request's
    is_disconnected) is cancelled (its slots freed) within ``every_s``; a streamed one notices
    at its next event instead."""
    while not all(r.done for r in call.all_reqs):
        if await gone():
            call.cancel()
            return
        await asyncio.sleep(every_s)


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
