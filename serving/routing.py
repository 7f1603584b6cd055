"""Adapter-aware request routing over Ray Serve's request router API.

Each model replica reports, through Serve's routing stats (`AdapterModel.record_routing_stats`),
the adapters on its device and the registry change it has caught up with. The ingress's
handle routes a call naming an adapter (read from the call itself: Serve's multiplexed
model id would also split `@serve.batch` batches per adapter) to the first of these that
holds no more than `max_imbalance` requests in flight beyond the least loaded replica:

1. the adapter's home: the highest rendezvous hash of (adapter, replica), so each replica
   serves a stable share of the adapters, and a replica that joins (autoscaling, a
   restart) takes over about 1/N of them at once;
2. the replicas that already hold the adapter on their device, least loaded first (where
   a hot adapter spilled to before);
3. else the less loaded of two random replicas, as Serve's default router does.

Requests that name no adapter (the bare backbone), and every request when affinity is
off, use power of two choices. Batches stay mixed inside each replica: this only decides
which replica a request joins.

The same stats tell the ingress which replicas are live and what each has applied
(`serving/fleet.py`): that is how admin changes wait for every replica to converge.
"""

from __future__ import annotations

import hashlib
import random

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from adapters.store.names import AdapterRef
from serving import fleet
from serving.fleet import ReplicaView

ROUTER_PATH = "serving.routing:AdapterAffinityRouter"


def rendezvous_score(adapter: str, replica: str) -> int:
    """Highest-random-weight hashing: stable per (adapter, replica), independent of the others."""
    return int.from_bytes(hashlib.blake2b(f"{adapter}\0{replica}".encode(), digest_size=8).digest(), "big")


class AdapterAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, affinity: bool = True, max_imbalance: int = 16) -> None:
        """`affinity` off: power of two choices for every request (the baseline it is measured against)."""
        self.affinity, self.max_imbalance = affinity, max_imbalance
        self._device_sets: dict[str, tuple[list[str], frozenset[str]]] = {}
        fleet.track(self.app_name, self)

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        adapter = adapter_of(pending_request)
        if not (self.affinity and adapter) or len(candidate_replicas) < 2:
            return [two_random(candidate_replicas)]
        bound = min(self._queue_len(r) for r in candidate_replicas) + self.max_imbalance
        for replica in self.preferred(adapter, candidate_replicas):
            if self._queue_len(replica) <= bound:
                return [[replica], candidate_replicas]
        return [two_random(candidate_replicas)]

    def preferred(self, adapter: str, candidates: list[RunningReplica]) -> list[RunningReplica]:
        """The adapter's home, then the replicas holding it on their device, least loaded first."""
        if len(self._device_sets) > 2 * len(candidates) + 8:  # forget replicas long gone
            live = {r.replica_id.unique_id for r in candidates}
            self._device_sets = {k: v for k, v in self._device_sets.items() if k in live}
        home = max(candidates, key=lambda r: rendezvous_score(adapter, r.replica_id.unique_id))
        holders = sorted((r for r in candidates if r is not home and adapter in self._on_device(r)),
                         key=self._queue_len)
        return [home, *holders]

    def _queue_len(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def _on_device(self, replica: RunningReplica) -> frozenset[str]:
        """The replica's device adapters as a set, rebuilt only when its stats change."""
        names = (replica.routing_stats or {}).get("device_adapters", [])
        key = replica.replica_id.unique_id
        cached = self._device_sets.get(key)
        if cached is None or cached[0] is not names:  # holding the list keeps its identity unique
            cached = (names, frozenset(names))
            self._device_sets[key] = cached
        return cached[1]

    def views(self) -> list[ReplicaView]:
        return [
            ReplicaView(r.replica_id.unique_id, r.node_id, dict(r.routing_stats or {}))
            for r in self.curr_replicas.values()
        ]


def adapter_of(request: PendingRequest | None) -> str | None:
    """The adapter name (versions share a home) of a call that names one (classify, complete)."""
    call = request.args[0] if request is not None and request.args else None
    adapter = getattr(call, "adapter", None)
    return adapter.name if isinstance(adapter, AdapterRef) else None


def two_random(replicas: list[RunningReplica]) -> list[RunningReplica]:
    return random.sample(replicas, min(2, len(replicas)))
