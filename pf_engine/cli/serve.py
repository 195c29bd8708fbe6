"""pf-serve: serve the engine over an OpenAI-compatible HTTP API.

    pf-serve                                        # bundled SmolLM2-135M-Instruct, 127.0.0.1:8000
    pf-serve --adapters bigfive --port 8001 --slots 8 --api-key "$KEY"

Endpoints: POST /v1/chat/completions and /v1/completions (stream: true for server-sent events),
GET /v1/models (the base id, and one id per persona: ID:extraversion+, ID:auto, ...), /health,
/metrics (Prometheus).  Requests share one continuous batch (Engine.submit).
"""
from __future__ import annotations

import os
import re
import sys

from pf_engine.errors import PFError
from pf_engine.cli.common import Parser, fail


def build_parser() -> Parser:
    p = Parser(prog="pf-serve", description="Serve PersonaFuse Engine over an OpenAI-compatible API.")
    p.add_argument("--model", default=None,
                   help="HF-layout folder or .gguf (default: bundled SmolLM2-135M-Instruct)")
    p.add_argument("--adapters", default=None,
                   help="persona adapter bank: a .safetensors file or a shipped name (bigfive)")
    p.add_argument("--model-id", default=None,
                   help="the id clients name (default: the model folder's name, lowercased)")
    p.add_argument("--backend", default=None, help="mixing backend: auto, torch, naive, ...")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--slots", type=int, default=None, help="requests decoded together (default 8)")
    p.add_argument("--max-len", type=int, default=None, help="cache columns per slot")
    p.add_argument("--kv-cache-gb", type=float, default=None, help="size the pool by memory")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a slot before new ones get 429 (default 64)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default 600)")
    p.add_argument("--api-key", default=os.environ.get("PF_API_KEY"),
                   help="require Authorization: Bearer KEY (default: $PF_API_KEY, else none)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    return p


def model_id(folder: str) -> str:
    name = os.path.basename(os.path.normpath(folder)).lower()
    return re.sub(r"[^a-z0-9._-]+", "-", name).strip("-") or "model"


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("port", "max_queue"):
        v = getattr(args, name)
        if v < 0 or (name == "port" and v > 65535):
            return fail("pf-serve", PFError(f"--{name.replace('_', '-')} {v}: out of range"))
    if args.timeout <= 0:
        return fail("pf-serve", PFError(f"--timeout {args.timeout}: expected seconds > 0"))
    import torch
    import uvicorn
    from pf_engine.engine import Engine
    from pf_engine.serve import build_app
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        eng = Engine.from_pretrained(args.model, adapters=args.adapters, device=args.device,
                                     dtype=args.dtype, backend=args.backend)
        eng.scheduler(slots=args.slots, max_len=args.max_len, kv_cache_gb=args.kv_cache_gb)
    except PFError as e:
        return fail("pf-serve", e)
    mid = args.model_id or model_id(eng.folder)
    app = build_app(eng, mid, max_queue=args.max_queue, api_key=args.api_key, timeout_s=args.timeout)
    print(f"pf-serve: {mid} on http://{args.host}:{args.port}/v1 "
          f"({len(app.state.catalog.ids())} model ids, {eng.scheduler().slots} slots)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
