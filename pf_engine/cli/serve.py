"""pf-serve: serve the engine over an OpenAI-compatible HTTP API.

    pf-serve                                        # bundled SmolLM2-135M-Instruct, 127.0.0.1:8000
    pf-serve --adapters bigfive --port 8001 --slots 8 --api-key "$KEY"

Endpoints: POST /v1/chat/completions and /v1/completions (stream: true for server-sent events),
POST /tokenize and /detokenize, GET /tokenizer_info, GET /v1/models (the base id, and one id per
persona: ID:extraversion+, ID:auto, ...), /health, /metrics (Prometheus).  Limits: body size
(--max-body-mb), JSON depth and finite numbers (serve/limits.py), connections
(--max-connections, idle ones closed first), a request head's time (--header-timeout-s), idle
keep-alive (--keep-alive-s); SIGTERM/SIGINT shut down within --grace-s
and exit 0.  Requests share one continuous batch (Engine.submit).  Every request is
logged on stderr in one line (id, endpoint, model id, persona kind, status, tokens, ms), and a
closing line sums up what was served.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time

from pf_engine.cli.common import Parser, add_engine_args, check_engine_args, fail
from pf_engine.errors import PFError
from pf_engine.serve.protocol import model_id


def build_parser() -> Parser:
    p = Parser(prog="pf-serve",
               description="Serve PersonaFuse Engine over an OpenAI-compatible API.")
    add_engine_args(p)
    p.add_argument("--model-id", default=None,
                   help="the id clients name (default: the model folder's name, lowercased)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=None, help="requests decoded together (default 8)")
    p.add_argument("--max-len", type=int, default=None, help="cache columns per slot")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="size the pool by memory")
    p.add_argument("--prefix-cache-gb", type=float, default=None,
                   help="prompt KV kept for reuse across requests, per persona (default 1; 0: off)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests admitted beyond the slots (waiting for one) before new ones "
                        "get 429 (default 64)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--api-key", default=os.environ.get("PF_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $PF_API_KEY, else none)")
    p.add_argument("--max-body-mb", type=float, default=8.0,
                   help="largest request body in MiB (default 8; 413 past it)")
    p.add_argument("--max-connections", type=int, default=4096,
                   help="open connections at most; at the limit a new one closes the longest "
                        "idle one (default 4096; serve/connections.py)")
    p.add_argument("--header-timeout-s", type=float, default=5.0,
                   help="a connection whose request head is not complete this long after it "
                        "opened (or after its last response) is closed (default 5 s)")
    p.add_argument("--keep-alive-s", type=float, default=5.0,
                   help="idle keep-alive connections are closed after this (default 5 s)")
    p.add_argument("--grace-s", type=float, default=10.0,
                   help="on SIGTERM/SIGINT: stop admitting, let running requests finish for "
                        "this long, then cancel them and exit 0 (default 10 s)")
    p.add_argument("--quiet", action="store_true", help="no per-request log lines")
    p.add_argument("--replicas", type=int, default=None,
                   help="serve N engine replicas on Ray Serve behind this one endpoint, routed "
                        "by persona and system prompt (needs pip install 'pf-engine[ray]'; "
                        "serve/ray_serve.py)")
    p.add_argument("--ray-address", default=None,
                   help="with --replicas: join this Ray cluster (default: start a local one)")
    p.add_argument("--replica-threads", type=int, default=None,
                   help="with --replicas: CPU threads (Ray CPUs) per replica (default: the "
                        "machine's cores divided among the replicas)")
    return p


def engine_kwargs(args) -> dict:
    """Engine.from_pretrained's arguments from the command line (one engine or each replica's)."""
    return dict(model=args.model, adapters=args.adapters, device=args.device, dtype=args.dtype,
                backend=args.backend, quantize=args.quantize, expert_format=args.expert_format,
                deterministic=args.deterministic, tensor_parallel=args.tensor_parallel)


def scheduler_kwargs(args) -> dict:
    return dict(slots=args.slots, max_len=args.max_len, kv_cache_gb=args.kv_cache_gb)


def serve_replicas(args) -> int:
    """--replicas N: the endpoint on Ray Serve (serve/ray_serve.py) until SIGINT/SIGTERM."""
    from pf_engine.serve import ray_serve
    n = args.replicas if args.replicas is not None else 1
    if n < 1:
        return fail("pf-serve", PFError(f"--replicas {n}: expected an integer >= 1"))
    threads = args.replica_threads or max(1, (os.cpu_count() or 1) // n)
    if threads < 1:
        return fail("pf-serve", PFError(f"--replica-threads {threads}: expected an integer >= 1"))
    try:
        ray_serve.require_ray()
    except PFError as e:
        return fail("pf-serve", e)
    spec = {"engine": engine_kwargs(args), "scheduler": scheduler_kwargs(args),
            "prefix_cache_gb": args.prefix_cache_gb, "model_id": args.model_id,
            "threads": threads, "quiet": args.quiet,
            "server": {"max_queue": args.max_queue, "timeout_s": args.timeout,
                       "max_body": int(args.max_body_mb * 2 ** 20)}}
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _frame: stop.append(s))
    try:
        ray_serve.deploy(spec, n, args.host, args.port, args.api_key,
                         spec["server"]["max_body"], ray_address=args.ray_address,
                         cpus=threads, gpus=1 if args.device and "cuda" in args.device else 0)
    except PFError as e:
        return fail("pf-serve", e)
    print(f"pf-serve: {n} replicas on http://{args.host}:{args.port}/v1 (Ray Serve, "
          f"{threads} threads each)", file=sys.stderr)
    while not stop:
        time.sleep(0.2)
    ray_serve.shutdown()
    print(f"pf-serve: shut down on {signal.Signals(stop[0]).name}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("port", "max_queue"):
        v = getattr(args, name)
        if v < 0 or (name == "port" and v > 65535):
            return fail("pf-serve", PFError(f"--{name.replace('_', '-')} {v}: out of range"))
    if args.prefix_cache_gb is not None and not (math.isfinite(args.prefix_cache_gb)
                                                 and args.prefix_cache_gb >= 0):
        return fail("pf-serve", PFError(f"--prefix-cache-gb {args.prefix_cache_gb}: "
                                        "expected a number >= 0 "
                                        "(0: off)"))
    for name in ("timeout", "max_body_mb", "max_connections", "keep_alive_s", "grace_s",
                 "header_timeout_s"):
        v = getattr(args, name)
        if not math.isfinite(v) or v <= 0:
            return fail("pf-serve", PFError(f"--{name.replace('_', '-')} {v}: expected a number "
                                            "> 0"))
    try:
        check_engine_args(args)                   # every bad value named before the model loads
    except PFError as e:
        return fail("pf-serve", e)
    if args.replicas is not None or args.ray_address is not None:
        return serve_replicas(args)
    import uvicorn

    from pf_engine.engine import Engine
    from pf_engine.serve import build_app
    from pf_engine.serve.connections import guarded
    logging.basicConfig(stream=sys.stderr, format="pf-serve: %(message)s")
    logging.getLogger("pf_engine.serve").setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        eng = Engine.from_pretrained(**engine_kwargs(args))
        if args.prefix_cache_gb is not None:
            eng.set_prefix_cache(args.prefix_cache_gb)
        eng.new_scheduler(**scheduler_kwargs(args))
    except PFError as e:
        return fail("pf-serve", e)
    mid = args.model_id or model_id(eng.folder)
    app = build_app(eng, mid, max_queue=args.max_queue, api_key=args.api_key,
                    timeout_s=args.timeout,
                    max_body=int(args.max_body_mb * 2 ** 20))
    print(f"pf-serve: {mid} on http://{args.host}:{args.port}/v1 "
          f"({len(app.state.catalog.ids())} model ids, {eng.scheduler().slots} slots, "
          f"{eng.weight_formats}; greedy "
          f"{'batch-invariant' if eng.batch_invariant else 'may depend on the batch'})",
          file=sys.stderr)
    # uvicorn handles SIGTERM / SIGINT: it closes the listening socket, waits up to grace_s for
    # the open requests, then cancels them (their slots are freed), returns, and re-raises the
    # signal to the handler it found, which is this one: note it, so that the exit status is 0
    signals: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda s, _frame: signals.append(s))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                http=guarded(args.header_timeout_s, int(args.max_connections)),
                timeout_keep_alive=args.keep_alive_s, timeout_graceful_shutdown=args.grace_s)
    served = app.state.served
    why = f" on {signal.Signals(signals[0]).name}" if signals else ""
    print(f"pf-serve: shut down{why} after {time.monotonic() - served['t0']:.0f} s: "
          f"{served['requests']} "
          f"requests, {served['tokens']} tokens generated", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
