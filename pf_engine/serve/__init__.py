"""pf-serve: the engine behind an OpenAI-compatible HTTP API (app.py), its request and response
shapes (protocol.py) and its Prometheus metrics (metrics.py).  The CLI is pf_engine/cli/serve.py."""
from pf_engine.serve.app import build_app

__all__ = ["build_app"]
