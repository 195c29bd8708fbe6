"""What a scheduler is built with: its defaults and their checks, in one place.

    cfg = SchedulerConfig(slots=4, max_len=512)          # anything not given: its default
    sched = Scheduler(engine, cfg)              # Engine.new_scheduler(slots=4, ...) does this

slots           requests in flight at most: 8, or as many as ``kv_cache_gb`` GiB of KV hold
max_len         cache columns per slot (prompt + new tokens of one request): the model's
                context, capped at 4096
prefill_budget  prompt tokens prefilled per step over all requests being prefilled (a long
                prompt or a burst of arrivals delays the running requests' next token by one
                chunk of this size at most): 128
background      a thread runs the steps while requests are pending (False: the caller steps)
kv_cache_gb     size the pool by memory instead of by ``slots``
decode          "dynamic" (shapes fit each batch), "static" or "graphs" (CUDA graphs;
                static_decode.py): graphs on one CUDA device, dynamic otherwise
prefix_cache    "engine" (the engine's, Engine.prefix_cache), a PrefixCache, or None (off)
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from pf_engine.errors import RequestError

SLOTS = 8
MAX_LEN_CAP = 4096
PREFILL_BUDGET = 128
DECODE_MODES = ("dynamic", "static", "graphs")


def _count(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise RequestError(f"{name}={value!r}: expected an integer >= {low}")


def slot_bytes(engine, max_len: int) -> int:
    """Bytes of one slot: keys and values of ``max_len`` columns in every layer."""
    c = engine.config
    return (2 * c.num_hidden_layers * c.num_key_value_heads * max_len * c.head_dim
            * engine.model.dtype.itemsize)


def slots_for(engine, max_len: int, slots, kv_cache_gb):
    """The pool's slot count by memory: as many slots of ``max_len`` columns as ``kv_cache_gb``
    GiB hold (checked against ``slots`` when both are given); ``slots`` as given without a
    budget (None: the scheduler's default, runtime/config.py)."""
    if kv_cache_gb is None:
        return slots
    ok = (isinstance(kv_cache_gb, (int, float)) and not isinstance(kv_cache_gb, bool)
          and kv_cache_gb > 0)
    if not ok:
        raise RequestError(f"kv_cache_gb={kv_cache_gb!r}: expected a number > 0")
    per = slot_bytes(engine, max_len)
    fit = int(kv_cache_gb * 2 ** 30 // per)
    if fit < 1:
        raise RequestError(f"kv_cache_gb={kv_cache_gb}: one slot of {max_len} columns needs "
                           f"{per / 2 ** 30:.3f} GiB (lower max_len or raise the budget)")
    if slots is not None and isinstance(slots, int) and slots > fit:
        raise RequestError(f"slots={slots}: {slots} slots of {max_len} columns need "
                           f"{slots * per / 2 ** 30:.3f} GiB; kv_cache_gb={kv_cache_gb}")
    return fit if slots is None else slots


@dataclass(frozen=True)
class SchedulerConfig:
    slots: int | None = None
    max_len: int | None = None
    prefill_budget: int = PREFILL_BUDGET
    background: bool = True
    kv_cache_gb: float | None = None
    decode: str | None = None
    prefix_cache: object = "engine"

    @classmethod
    def of(cls, **given) -> "SchedulerConfig":
        """A config from keywords, those given as None taking their defaults."""
        return cls(**{k: v for k, v in given.items() if v is not None})

    def settings(self) -> dict:
        """new_scheduler's keywords for a scheduler like this one (a resolved config's)."""
        return {"slots": self.slots, "max_len": self.max_len, "prefill_budget": self.prefill_budget,
                "background": self.background, "decode": self.decode}

    def resolved(self, engine) -> "SchedulerConfig":
        """Every default decided for ``engine`` and every value checked (one-line
        RequestErrors): slots, max_len and decode are set."""
        max_len = self.max_len or min(engine.config.max_position_embeddings, MAX_LEN_CAP)
        _count("max_len", max_len, 2)
        _count("prefill_budget", self.prefill_budget, 1)
        slots = slots_for(engine, max_len, self.slots, self.kv_cache_gb)
        if slots is None:
            slots = SLOTS
        _count("slots", slots, 1)
        decode = self.decode or ("graphs" if engine.device.type == "cuda"
                                 and engine.tensor_parallel == 1 else "dynamic")
        if decode not in DECODE_MODES:
            raise RequestError(f"decode={decode!r}: expected dynamic, static or graphs")
        return replace(self, slots=slots, max_len=int(max_len), decode=decode)
