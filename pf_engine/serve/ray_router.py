"""The replicas' request router on Ray Serve (imported only where Ray is installed): the persona-
and prefix-aware policy of affinity.py over Ray's candidates and its cache of their queue
lengths (0 where it has none yet).  It runs in the process holding the replicas' handle, the
ingress, whose /metrics reads its decisions (affinity.total_counts)."""
from __future__ import annotations

import collections

from ray.serve.request_router import FIFOMixin, RequestRouter

from pf_engine.serve import affinity


class PersonaAffinityRouter(FIFOMixin, RequestRouter):
    """Ranks the candidates for a request: the policy's choice first, then the others (Ray sends
    the request to the first rank's replica when it accepts, else goes down the ranks)."""

    def initialize_state(self, margin: int = 4, **kwargs):
        self.policy = affinity.AffinityPolicy(margin)
        affinity.register(self.policy)
        self.inflight: collections.Counter = collections.Counter()   # replica -> requests
        self.chosen: dict = {}             # request id -> replica chosen, not routed yet

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        key = key_of(pending_request)
        if key is None or not candidate_replicas:
            return [candidate_replicas]
        by_id = {r.replica_id: r for r in candidate_replicas}
        waiting = collections.Counter(self.chosen.values())
        queues = {rid: self.inflight[rid] + waiting[rid] for rid in by_id}
        pick = self.policy.choose(key, queues)
        self.chosen[pending_request.metadata.internal_request_id] = pick
        rest = [r for rid, r in by_id.items() if rid != pick]
        return [[by_id[pick]], rest] if rest else [[by_id[pick]]]

    def on_request_routed(self, pending_request, replica_id, result):
        """The request went to ``replica_id``: it counts there until its result is done (the
        queue lengths the policy compares: this ingress sends every request)."""
        self.chosen.pop(pending_request.metadata.internal_request_id, None)
        self.inflight[replica_id] += 1
        result.add_done_callback(lambda _: self._done(replica_id))

    def _done(self, replica_id) -> None:
        if self.inflight[replica_id] > 0:
            self.inflight[replica_id] -= 1

    def on_replica_actor_died(self, replica_id):
        self.policy.forget(replica_id)
        self.inflight.pop(replica_id, None)
        super().on_replica_actor_died(replica_id)

    def on_replica_actor_unavailable(self, replica_id):
        self.policy.forget(replica_id)
        super().on_replica_actor_unavailable(replica_id)


def key_of(pending_request):
    """The affinity key Replica.complete's caller passed (its third argument), or None (a call
    of another method: any replica)."""
    args = getattr(pending_request, "args", None) or ()
    return tuple(args[2]) if len(args) > 2 and args[2] is not None else None


class RoundRobinRouter(FIFOMixin, RequestRouter):
    """The baseline the affinity router is measured against (benchmarks/bench_replicas.py): the
    candidates in turn, whatever the request."""

    def initialize_state(self, **kwargs):
        self.turn = 0

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return [candidate_replicas]
        ids = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        first = ids[self.turn % len(ids)]
        self.turn += 1
        return [[first], [r for r in ids if r is not first]] if len(ids) > 1 else [[first]]


ROUTERS = {"affinity": PersonaAffinityRouter, "round-robin": RoundRobinRouter}
