"""Prometheus metrics of a pf-serve process (GET /metrics, text format 0.0.4).

    pf_requests_total{endpoint, persona_kind, status}      finished requests (ok, cancelled,
                                                            timeout, rejected, error)
    pf_queue_depth, pf_running_requests                     the scheduler, read at scrape time
    pf_admitted_requests                                    slots reserved by admitted HTTP
                                                            requests (running, waiting or being
                                                            prepared; the queue bound's count)
    pf_generated_tokens_total{persona_kind}
    pf_tokens_per_second                                    generated tokens over the last 10 s
    pf_time_to_first_token_seconds{persona_kind}            histograms
    pf_time_per_output_token_seconds{persona_kind}

    pf_prefix_cache_lookups_total, pf_prefix_cache_hits_total   requests that looked in the
                                                            prefix cache / reused blocks of it
    pf_prefix_cache_hit_tokens_total                        prompt tokens not prefilled
    pf_prefix_cache_shared_hit_tokens_total                 of them, from the persona-independent
                                                            layers (their persona's computed)
    pf_prefix_cache_evictions_total                         blocks dropped for room
    pf_prefix_cache_bytes, pf_prefix_cache_blocks           what it holds now

By the model id a request named (protocol.Catalog's ids: bounded) and by expert:

    pf_model_requests_total{model, status}                 finished requests
    pf_model_generated_tokens_total{model}
    pf_model_time_to_first_token_seconds{model}            histograms: arrival to first token,
    pf_model_request_seconds{model}                        arrival to last
    pf_expert_requests_total{bank, expert}                 choices that ran with a nonzero gate
                                                            on the expert
    pf_expert_gate_mass_total{bank, expert}                their gates summed (token routing:
                                                            each choice's mean over tokens)
    pf_expert_generated_tokens_total{bank, expert}         their tokens
    pf_bank_bytes{bank}, pf_bank_experts{bank}             the bank loaded (bytes of its tensors)
    pf_speculative_draft_tokens_total                      runtime/speculative.py:
    pf_speculative_accepted_tokens_total                    tokens drafted, and of them accepted

persona_kind: base, explicit, sequence or token (persona.Personas kinds).  bank: the bank's name
(its file's stem, else "default").
"""
from __future__ import annotations

import collections
import os
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

WINDOW_S = 10.0
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2)


class Metrics:
    def __init__(self, scheduler_of, bank_of=lambda: None):
        """scheduler_of(): the engine's current scheduler; bank_of(): its adapter bank or None
        (both read at each scrape)."""
        self.registry = r = CollectorRegistry()
        self.requests = Counter("pf_requests", "Finished requests",
                                ["endpoint", "persona_kind", "status"],
                                registry=r)
        self.tokens = Counter("pf_generated_tokens", "Generated tokens", ["persona_kind"],
                              registry=r)
        self.ttft = Histogram("pf_time_to_first_token_seconds", "Arrival to first token",
                              ["persona_kind"], buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("pf_time_per_output_token_seconds",
                              "Mean time per output token after "
                              "the first", ["persona_kind"], buckets=TPOT_BUCKETS, registry=r)
        Gauge("pf_queue_depth", "Requests waiting for a slot", registry=r).set_function(
            lambda: len(scheduler_of().waiting))
        Gauge("pf_running_requests", "Requests holding a slot", registry=r).set_function(
            lambda: len(scheduler_of().running))
        self.reserved = lambda: 0                  # set by the app (serve/app.Server.reserved)
        Gauge("pf_admitted_requests", "Slots reserved by admitted requests",
              registry=r).set_function(lambda: self.reserved())
        Gauge("pf_tokens_per_second", f"Generated tokens per second over the last {WINDOW_S:g} s",
              registry=r).set_function(self._rate)
        r.register(PrefixCacheCollector(scheduler_of))
        self.model_requests = Counter("pf_model_requests", "Finished requests by model id",
                                      ["model", "status"], registry=r)
        self.model_tokens = Counter("pf_model_generated_tokens", "Generated tokens by model id",
                                    ["model"], registry=r)
        self.model_ttft = Histogram("pf_model_time_to_first_token_seconds",
                                    "Arrival to first token by model id", ["model"],
                                    buckets=TTFT_BUCKETS, registry=r)
        self.model_e2e = Histogram("pf_model_request_seconds", "Arrival to last token by model id",
                                   ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.expert_requests = Counter("pf_expert_requests", "Choices run with a nonzero gate on "
                                       "the expert", ["bank", "expert"], registry=r)
        self.expert_mass = Counter("pf_expert_gate_mass", "Gates on the expert summed over "
                                   "choices", ["bank", "expert"], registry=r)
        self.expert_tokens = Counter("pf_expert_generated_tokens", "Tokens of the choices run "
                                     "with the expert", ["bank", "expert"], registry=r)
        self.bank_of = bank_of
        r.register(BankCollector(bank_of))
        self._recent: collections.deque = collections.deque()       # (time, tokens)
        self._lock = threading.Lock()

    def finished(self, endpoint: str, kind: str, status: str, reqs=(),
                 model: str | None = None) -> None:
        """Count an API request; with its scheduler Requests (one per choice), their tokens,
        latencies and gates too; by ``model`` (the id it named) where given."""
        self.requests.labels(endpoint, kind, status).inc()
        if model is not None:
            self.model_requests.labels(model, status).inc()
        bank = self.bank_of()
        for req in reqs:
            if bank is not None:
                self._experts(bank, req)
            if not req.tokens:
                continue
            n = len(req.tokens)
            self.tokens.labels(kind).inc(n)
            with self._lock:
                self._recent.append((time.monotonic(), n))
            if model is not None:
                self.model_tokens.labels(model).inc(n)
            if req.t_first is not None:
                self.ttft.labels(kind).observe(req.t_first - req.t_submit)
                if model is not None:
                    self.model_ttft.labels(model).observe(req.t_first - req.t_submit)
                if n > 1 and req.t_done is not None:
                    self.tpot.labels(kind).observe((req.t_done - req.t_first) / (n - 1))
            if model is not None and req.t_done is not None:
                self.model_e2e.labels(model).observe(req.t_done - req.t_submit)

    def _experts(self, bank, req) -> None:
        """The experts a choice ran with: its gate row (Request.gate_row), nonzero entries."""
        row = req.gate_row()
        if row is None:
            return
        name = bank_name(bank)
        for expert, w in zip(bank.expert_names, row.tolist()):
            if w > 0:
                self.expert_requests.labels(name, expert).inc()
                self.expert_mass.labels(name, expert).inc(w)
                self.expert_tokens.labels(name, expert).inc(len(req.tokens))

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / WINDOW_S

    def text(self) -> bytes:
        return generate_latest(self.registry)


class PrefixCacheCollector:
    """The prefix cache's counters (runtime/prefix_cache.py), read at scrape time; zero when off;
    and speculative decoding's (the scheduler's Stats)."""

    COUNTERS = (("lookups", "Requests that looked in the prefix cache"),
                ("hits", "Requests that reused cached prompt blocks"),
                ("hit_tokens", "Prompt tokens not prefilled thanks to the prefix cache"),
                ("shared_hit_tokens", "Of them, tokens whose lower layers were shared across "
                 "personas and whose persona layers were computed from kept hidden states"),
                ("evictions", "Prefix cache blocks dropped for room"))

    def __init__(self, scheduler_of):
        self.scheduler_of = scheduler_of

    def collect(self):
        cache = self.scheduler_of().prefix
        for name, doc in self.COUNTERS:
            yield CounterMetricFamily(f"pf_prefix_cache_{name}", doc,
                                      value=getattr(cache.stats, name) if cache else 0)
        yield GaugeMetricFamily("pf_prefix_cache_bytes", "Bytes of KV the prefix cache holds",
                                value=cache.bytes if cache else 0)
        yield GaugeMetricFamily("pf_prefix_cache_blocks", "Blocks the prefix cache holds",
                                value=cache.blocks if cache else 0)
        st = self.scheduler_of().stats
        yield CounterMetricFamily("pf_speculative_draft_tokens", "Tokens drafted by prompt lookup",
                                  value=st.draft_tokens)
        yield CounterMetricFamily("pf_speculative_accepted_tokens", "Drafted tokens the target "
                                  "accepted", value=st.accepted_tokens)


def bank_name(bank) -> str:
    """The metrics' bank label: its file's stem (AdapterBank.source), else "default"."""
    src = getattr(bank, "source", None)
    return os.path.splitext(os.path.basename(str(src)))[0] if src else "default"


class BankCollector:
    """The bank loaded, read at scrape time: its bytes and experts (none without a bank)."""

    def __init__(self, bank_of):
        self.bank_of = bank_of

    def collect(self):
        bank = self.bank_of()
        size = GaugeMetricFamily("pf_bank_bytes", "Bytes of the loaded bank's tensors",
                                 labels=["bank"])
        count = GaugeMetricFamily("pf_bank_experts", "Experts of the loaded bank", labels=["bank"])
        if bank is not None:
            size.add_metric([bank_name(bank)], bank.nbytes)
            count.add_metric([bank_name(bank)], bank.num_experts)
        yield size
        yield count
