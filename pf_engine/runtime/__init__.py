"""How requests run: the continuous-batching scheduler (scheduler.py) over a pool of KV slots
(kv_cache.py), its static-shape decode step for CUDA graphs (static_decode.py), and the CPU
thread policy every step enters (threads.py)."""
