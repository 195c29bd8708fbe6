"""pf-serve's replicas on Ray Serve: one OpenAI endpoint over N engines (pip install
'pf-engine[ray]'; Ray is never a core dependency).

    pf-serve --replicas 2 --adapters bigfive            # a local Ray instance
    pf-serve --replicas 4 --ray-address HOST:6379        # join a running cluster

Two deployments:

    Ingress   the HTTP endpoint: pf-serve's own routes, errors, API-key check and server-sent
              events (app.app_for over a RemoteServer).  A completion's body is read and checked
              for size here, its affinity key computed (affinity.py), and it goes to a replica
              through the deployment handle, whose request router (PersonaAffinityRouter) picks
              the replica: the one that last served the same persona and system prompt, or the
              same system prompt, unless its queue is too long; else the power of two choices.
    Replica   one Engine, its scheduler and its Server (app.py): a completion is
              ``Server.start`` then ``Server.result`` or ``Server.events``, exactly as in
              pf-serve, handed back as a stream of items: a head ({"status", "body", "headers"}
              for a JSON answer, {"stream": True} before server-sent events), then the events.

Faults.  A replica that dies fails only the requests it holds: a JSON answer becomes a 503 naming
the replica, a stream ends with an error event; Ray Serve's controller replaces the replica (its
health check calls ``Replica.check_health``: the scheduler's thread must be alive), and the router
stops choosing it, so the endpoint keeps answering.  /metrics on the endpoint: the router's
decisions by reason and the requests each replica answered, by status.
"""
from __future__ import annotations

import asyncio
import os

from fastapi import Request
from fastapi.responses import StreamingResponse

from pf_engine.errors import PFError
from pf_engine.serve import affinity
from pf_engine.serve.app import Server, app_for, sse
from pf_engine.serve.limits import read_json
from pf_engine.serve.protocol import APIError

EXTRA = "pip install 'pf-engine[ray]' (ray[serve])"
OBJECT_STORE_BYTES = 96 * 2 ** 20   # requests and answers are small: a small object store
MAX_ONGOING = 256               # requests a replica holds (its own queue answers 429 past it)
INGRESS_ONGOING = 4096          # requests the endpoint holds at once (Serve's default is 5: the
                                # ingress would meter every replica's load to five requests)
HANG_S = 60.0                   # a replica whose scheduler makes no step this long is unhealthy
APP = "pf"


def require_ray():
    """Ray Serve's modules, or one PFError naming the extra to install."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise PFError(f"--replicas needs Ray Serve, which is not installed: {EXTRA}") from None
    return ray, serve


class RelayedError(APIError):
    """An APIError a replica answered, relayed with its body as it was."""

    def __init__(self, status: int, body: dict, headers: dict | None):
        super().__init__(status, body.get("error", {}).get("message", ""), None)
        self._body, self.headers = body, headers or {}

    def body(self) -> dict:
        return self._body


def _error_head(e: APIError, replica: str) -> dict:
    return {"status": e.status, "body": e.body(), "headers": e.headers, "replica": replica}


# the replica ---------------------------------------------------------------------------------
class Replica:
    """One engine behind the endpoint (see the module docstring).  ``spec``: what pf-serve's
    command line built: engine (Engine.from_pretrained's arguments), scheduler
    (Engine.new_scheduler's), prefix_cache_gb, model_id, server (Server's limits), threads,
    quiet (no per-request log lines)."""

    def __init__(self, spec: dict):
        import logging

        import torch

        from pf_engine.engine import Engine
        logging.getLogger("pf_engine.serve").setLevel(
            logging.WARNING if spec.get("quiet") else logging.INFO)
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
            pin(_local_rank(), spec["threads"])
        eng = Engine.from_pretrained(**spec["engine"])
        if spec.get("prefix_cache_gb") is not None:
            eng.set_prefix_cache(spec["prefix_cache_gb"])
        eng.new_scheduler(**spec.get("scheduler", {}))
        self.engine = eng
        from pf_engine.serve.protocol import model_id
        self.server = Server(eng, spec.get("model_id") or model_id(eng.folder), **spec["server"])
        self.name = f"{os.getpid()}"
        try:
            from ray import serve
            self.name = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside Ray (tests call it directly): the pid
            pass

    async def complete(self, body, kind: str, key=None):
        """A completion, start to end, as a stream of items (module docstring); ``key`` is the
        affinity key the router read."""
        try:
            st = await self.server.start(body, kind)
            if st.stream:
                yield {"stream": True, "replica": self.name}
                async for line in self.server.events(st):
                    yield line
                return
            yield {"status": 200, "body": await self.server.result(st), "replica": self.name}
        except APIError as e:
            yield _error_head(e, self.name)

    async def model_ids(self) -> list[str]:
        return await self.server.model_ids()

    async def tokens(self, what: str, body) -> dict:
        try:
            return {"status": 200, "body": await self.server.tokens(what, body)}
        except APIError as e:
            return _error_head(e, self.name)

    def check_health(self) -> None:
        """Ray Serve's health check: no step has ended for ``HANG_S`` while requests wait (a
        hung forward, or a stopped thread): Ray then replaces this replica."""
        if self.engine.scheduler().stalled(HANG_S):
            raise RuntimeError(f"the scheduler has pending requests and no step ended in "
                               f"{HANG_S:g} s")


def _local_rank() -> int | None:
    """This replica's rank among its deployment's replicas on this node (None outside Ray)."""
    try:
        from ray import serve
        return serve.get_replica_context().rank.local_rank
    except Exception:  # noqa: BLE001 - outside a replica, or a Ray without ranks
        return None


def pin(local_rank: int | None, threads: int) -> list[int] | None:
    """Pin this process to ``threads`` cores of those it may use, the local_rank-th group of
    them (wrapping around when the replicas want more cores than there are): every thread it
    has now (Ray's run the replica on several), so every thread started later inherits it.
    None, changing nothing, without a rank."""
    if local_rank is None or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    mine = sorted({cpus[(local_rank * threads + i) % len(cpus)] for i in range(threads)})
    tasks = os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]
    for tid in tasks:
        try:
            os.sched_setaffinity(int(tid), mine)
        except OSError:                       # a thread that ended meanwhile
            pass
    return mine


# the ingress ---------------------------------------------------------------------------------
class RemoteServer:
    """What app.py's routes ask of a Server, answered by the replicas through ``handle``."""

    def __init__(self, handle, max_body: int):
        self.handle, self.max_body = handle, max_body
        self.answered: dict[tuple[str, str], int] = {}      # (replica, status) -> requests

    async def model_ids(self) -> list[str]:
        return await self.handle.model_ids.remote()

    async def tokens(self, what: str, body) -> dict:
        head = await self._call(self.handle.tokens.remote(what, body))
        return self._answer(head)

    async def metrics_text(self) -> str:
        lines = ["# TYPE pf_router_decisions_total counter"]
        counts = affinity.total_counts()
        lines += [f'pf_router_decisions_total{{reason="{r}"}} {counts[r]}'
                  for r in affinity.REASONS]
        lines.append("# TYPE pf_replica_requests_total counter")
        lines += [f'pf_replica_requests_total{{replica="{rep}",status="{st}"}} {n}'
                  for (rep, st), n in sorted(self.answered.items())]
        return "\n".join(lines) + "\n"

    async def change_bank(self, body, load: bool) -> dict:
        """Run-time bank changes are a single server's (serve/adapters.py): each replica holds
        its own engine, and a change across replicas is not one step."""
        raise APIError(501, "loading or unloading adapters at run time is not supported with "
                       "--replicas: restart the deployment with the new bank", None,
                       "invalid_request_error", "not_supported")

    async def complete(self, request: Request, kind: str):
        body = await read_json(request, self.max_body)
        gen = self.handle.options(stream=True).complete.remote(
            body, kind, affinity.affinity_key(body, kind))
        head = await self._first(gen, request)
        if head.get("stream"):
            return StreamingResponse(self._relay(gen, head["replica"]),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return self._answer(head)

    def _count(self, replica: str, status) -> None:
        k = (replica, str(status))
        self.answered[k] = self.answered.get(k, 0) + 1

    def _answer(self, head: dict):
        self._count(head.get("replica", "-"), head["status"])
        if head["status"] != 200:
            raise RelayedError(head["status"], head["body"], head.get("headers"))
        return head["body"]

    async def _call(self, awaitable):
        try:
            return await awaitable
        except Exception as e:  # noqa: BLE001 - a replica that died or failed: 503, named
            self._count("-", 503)
            raise APIError(503, f"a replica failed: {type(e).__name__}: {_short(e)}", None,
                           "server_error", "replica_failed") from None

    async def _first(self, gen, request: Request) -> dict:
        """The replica's head item; the client hanging up meanwhile cancels the replica's work."""
        watch = asyncio.ensure_future(_watch(request.is_disconnected, gen))
        try:
            return await self._call(gen.__anext__())
        finally:
            watch.cancel()

    async def _relay(self, gen, replica: str):
        """The replica's server-sent events; its death ends the stream with an error event."""
        status = "ok"
        try:
            async for line in gen:
                yield line
        except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
            status = "503"
            yield sse({"error": APIError(503, f"the replica failed mid-stream: "
                                              f"{type(e).__name__}: {_short(e)}", None,
                                         "server_error", "replica_failed").body()["error"]})
        finally:
            gen.cancel()
            self._count(replica, status if status != "ok" else 200)


async def _watch(gone, gen, every_s: float = 0.1) -> None:
    while True:
        if await gone():
            gen.cancel()
            return
        await asyncio.sleep(every_s)


def _short(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else "no detail"


# the application -----------------------------------------------------------------------------
def deploy(spec: dict, replicas: int, host: str, port: int, api_key: str | None, max_body: int,
           ray_address: str | None = None, margin: int = 4, cpus: float | None = None,
           gpus: float = 0, router: str = "affinity") -> None:
    """Start (or join, ``ray_address``) Ray, and run the endpoint on host:port over ``replicas``
    Replica(spec), each with ``cpus`` logical CPUs (its torch threads; default spec's threads)
    and ``gpus`` GPUs (Ray sets each one's CUDA_VISIBLE_DEVICES).  ``router``: "affinity" (the
    default) or "round-robin" (the baseline benchmarks/bench_replicas.py compares)."""
    ray, serve = require_ray()
    from ray.serve.config import RequestRouterConfig

    from pf_engine.serve.ray_router import ROUTERS
    if router not in ROUTERS:
        raise PFError(f"router={router!r}: expected one of {', '.join(ROUTERS)}")
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            ray.init(include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                     log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": host, "port": port}, detached=False)
    rep = serve.deployment(Replica, name="Replica", num_replicas=replicas,
                           ray_actor_options={"num_cpus": cpus or spec.get("threads") or 1,
                                              "num_gpus": gpus},
                           health_check_period_s=2.0, health_check_timeout_s=30.0,
                           max_ongoing_requests=MAX_ONGOING,
                           request_router_config=RequestRouterConfig(
                               request_router_class=ROUTERS[router],
                               request_router_kwargs={"margin": margin}
                               if router == "affinity" else {}))
    serve.run(ingress(api_key, max_body).bind(rep.bind(spec)), name=APP, route_prefix="/")


def ingress(api_key: str | None, max_body: int):
    """The Ingress deployment: pf-serve's app over a RemoteServer of the replicas' handle it is
    bound to (built in the ingress's process, once the handle is there)."""
    from ray import serve

    class Ingress:
        def __init__(self, replicas):
            self.replicas = replicas

        def __serve_build_asgi_app__(self):
            return app_for(RemoteServer(self.replicas, max_body), api_key)

    return serve.deployment(serve.ingress()(Ingress), name="Ingress",
                            ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=INGRESS_ONGOING)


def shutdown() -> None:
    ray, serve = require_ray()
    serve.shutdown()
    ray.shutdown()
