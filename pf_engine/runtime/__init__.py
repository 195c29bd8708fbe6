"""How requests run: the continuous-batching scheduler (scheduler.py, configured by config.py)
plans each step, the step runner (runner.py) runs it over a pool of KV slots
(model/kv_cache.py), with a static-shape decode step for CUDA graphs (static_decode.py)."""
