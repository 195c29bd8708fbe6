"""The replicas' request router on Ray Serve (imported only where Ray is installed): the persona-
and prefix-aware policy of affinity.py over Ray's candidates and its cache of their queue
lengths (0 where it has none yet).  It runs in the process holding the replicas' handle, the
ingress, whose /metrics reads its decisions (affinity.total_counts)."""
from __future__ import annotations

from ray.serve.request_router import FIFOMixin, RequestRouter

from pf_engine.serve import affinity


class PersonaAffinityRouter(FIFOMixin, RequestRouter):
    """Ranks the candidates for a request: the policy's choice first, then the others (Ray sends
    the request to the first rank's replica when it accepts, else goes down the ranks)."""

    def initialize_state(self, margin: int = 4, **kwargs):
        self.policy = affinity.AffinityPolicy(margin)
        affinity.register(self.policy)

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        key = key_of(pending_request)
        if key is None or not candidate_replicas:
            return [candidate_replicas]
        by_id = {r.replica_id: r for r in candidate_replicas}
        queues = {rid: self._replica_queue_len_cache.get(rid) or 0 for rid in by_id}
        pick = self.policy.choose(key, queues)
        rest = [r for rid, r in by_id.items() if rid != pick]
        return [[by_id[pick]], rest] if rest else [[by_id[pick]]]

    def on_replica_actor_died(self, replica_id):
        self.policy.forget(replica_id)
        super().on_replica_actor_died(replica_id)


def key_of(pending_request):
    """The affinity key Replica.complete's caller passed (its third argument), or None (a call
    of another method: any replica)."""
    args = getattr(pending_request, "args", None) or ()
    return tuple(args[2]) if len(args) > 2 and args[2] is not None else None
