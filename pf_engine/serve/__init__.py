"""pf-serve: the engine behind an OpenAI-compatible HTTP API (app.py): request validation
(protocol.py), one call's choices on the scheduler (choices.py), response bodies and logprobs
(shapes.py), the tokenizer endpoints (tokens.py), request limits (limits.py) and Prometheus
metrics (metrics.py).  The CLI is pf_engine/cli/serve.py."""
from pf_engine.serve.app import build_app

__all__ = ["build_app"]
