"""Prometheus metrics of one process, in its own registry, and their Ray Serve mirrors.

Under Ray Serve every series is also recorded through `ray.serve.metrics` (the
`Serve*Metrics` mirrors), so every replica, Ingress and AdapterModel alike, exports it
on its node's Ray metrics port as `ray_dcft_*`, tagged `application`, `deployment`
and `replica`: that is the cluster-wide view Prometheus and the dashboard use. The
app's /metrics serves only the local registry of the one Ingress replica that answers
it, and says so (`dcft_metrics_scope`).

Adapter names in labels are bounded: only adapters that exist and were served get a
series of their own (at most `max_adapter_labels`); invented, unknown or forbidden
names all share "other", so no client can grow the scrape. The mirror gets the same
bounded label. /metrics is admin-only: labels carry adapter and tenant names.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # `*_created` series double the scrape and say nothing here

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LOAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)


class AdapterLabels:
    """Maps adapter names to a bounded set of label values: a name earns its own label
    only once a request for it succeeded (so it exists and its caller may use it)."""

    def __init__(self, limit: int = 100):
        self.limit, self._served, self._lock = limit, set(), threading.Lock()

    def __call__(self, name: str | None, served: bool) -> str:
        if name is None:
            return "none"
        with self._lock:
            if name in self._served:
                return name
            if served and len(self._served) < self.limit:
                self._served.add(name)
                return name
        return "other"


class RequestMetrics:
    """What the HTTP edge sees: requests, latency by adapter, requests in flight.

    `mirror` (under Ray Serve: `ServeIngressMetrics`) receives every event too, so Ray's
    metrics port exports every Ingress replica's series; /metrics shows only this one's.
    """

    def __init__(self, registry: CollectorRegistry | None = None, max_adapter_labels: int = 100,
                 mirror: ServeIngressMetrics | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.mirror = mirror
        self.adapter_label = AdapterLabels(max_adapter_labels)
        self.requests = Counter("dcft_requests", REQUESTS_HELP, ["adapter", "route", "status"], registry=r)
        self.latency = Histogram("dcft_request_latency_seconds", LATENCY_HELP, ["adapter", "route"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("dcft_queue_depth", QUEUE_HELP, registry=r)
        self.responses = Counter("dcft_http_responses", RESPONSES_HELP, ["route", "status"], registry=r)
        self.rate_limited = Counter("dcft_rate_limited", RATE_LIMITED_HELP, ["tenant", "limit"], registry=r)
        self.replica = mirror.replica if mirror else "local"
        scope = Gauge("dcft_metrics_scope", SCOPE_HELP, ["scope", "replica"], registry=r)
        scope.labels("ingress_replica", self.replica).set(1)

    def observe_request(self, adapter: str | None, route: str, status: int, seconds: float) -> None:
        label = self.adapter_label(adapter, served=status == 200)
        self.requests.labels(label, route, str(status)).inc()
        self.latency.labels(label, route).observe(seconds)
        if self.mirror:
            self.mirror.observe_request(label, route, str(status), seconds)

    def response(self, route: str, status: int) -> None:
        self.responses.labels(route, str(status)).inc()
        if self.mirror:
            self.mirror.responses.inc(tags={"route": route, "status": str(status)})

    def refused(self, tenant: str, limit: str) -> None:
        self.rate_limited.labels(tenant, limit).inc()
        if self.mirror:
            self.mirror.rate_limited.inc(tags={"tenant": tenant, "limit": limit})

    def in_flight(self, count: int) -> None:
        self.queue_depth.set(count)
        if self.mirror:
            self.mirror.queue_depth.set(count)

    def exposition(self) -> bytes:
        """This process's edge series, after a comment saying what they cover."""
        head = (f"# dcft-hub /metrics: the HTTP edge series of ONE Ingress replica ({self.replica}), counted "
                "since it started; no model replica's series. Cluster-wide: the ray_dcft_* series on the Ray "
                "metrics export port of every node (sum them over `replica`).\n")
        return head.encode() + generate_latest(self.registry)


REQUESTS_HELP = "Requests by adapter, route and status."
LATENCY_HELP = "End-to-end request latency."
QUEUE_HELP = "Requests in flight through the HTTP edge."
RESPONSES_HELP = ("Every HTTP response by route and status, including those refused at the edge "
                  "(401, 403, 413, 400, 429).")
RATE_LIMITED_HELP = "Requests refused with 429, by tenant and limit."
SCOPE_HELP = ("What this answer covers (always 1): one Ingress replica's edge series. The cluster-wide series are "
              "ray_dcft_* on Ray's metrics port.")


class EngineMetrics:
    """What a model replica sees: batches, the adapter bank, load latency, memory.

    `mirror` (under Ray Serve: `ServeReplicaMetrics`) receives every event too, so Ray's
    metrics port exports all replicas, where the app's /metrics reaches one per scrape.
    """

    def __init__(self, registry: CollectorRegistry | None = None, mirror: ServeReplicaMetrics | None = None):
        self.registry = r = registry or CollectorRegistry()
        self.mirror = mirror
        self.batch_size = Histogram("dcft_batch_size", "Rows per forward pass.", buckets=SIZE_BUCKETS, registry=r)
        self.batch_adapters = Histogram("dcft_batch_distinct_adapters", "Distinct adapters per forward pass.",
                                        buckets=SIZE_BUCKETS, registry=r)
        self.bank_hits = Counter("dcft_bank_hits", "Adapter bank hits.", ["tier"], registry=r)
        self.bank_misses = Counter("dcft_bank_misses", "Adapter bank misses.", ["tier"], registry=r)
        self.bank_evictions = Counter("dcft_bank_evictions", "Adapter bank evictions.", ["tier"], registry=r)
        self.load_seconds = Histogram("dcft_adapter_load_seconds", LOAD_HELP, ["tier"], buckets=LOAD_BUCKETS,
                                      registry=r)
        self.rejected_versions = Counter("dcft_rejected_versions", REJECTED_HELP, registry=r)
        self.batch_splits = Counter("dcft_batch_splits", SPLIT_HELP, registry=r)
        self.resident = Gauge("dcft_bank_resident_adapters", "Adapters resident per tier.", ["tier"], registry=r)
        self._bank_counters = {"hit": self.bank_hits, "miss": self.bank_misses, "eviction": self.bank_evictions}
        self.bank_totals: dict[str, float] = {}  # "device_hit": n, ...: what the replica reports to routers
        self.device_memory = Gauge(
            "dcft_device_memory_bytes", "Device memory allocated (CUDA) or 0 on CPU.", registry=r
        )

    def bank_event(self, event: str, tier: str, value: float) -> None:
        if event == "load_seconds":
            self.load_seconds.labels(tier).observe(value)
        else:
            self._bank_counters[event].labels(tier).inc(value)
            self.bank_totals[f"{tier}_{event}"] = self.bank_totals.get(f"{tier}_{event}", 0) + value
        if self.mirror:
            self.mirror.bank_event(event, tier, value)

    def version_rejected(self) -> None:
        self.rejected_versions.inc()
        if self.mirror:
            self.mirror.rejected_versions.inc()

    def batch_split(self) -> None:
        self.batch_splits.inc()
        if self.mirror:
            self.mirror.batch_splits.inc()

    def observe_batch(self, rows: int, distinct: int, resident: Callable[[], dict[str, int]]) -> None:
        """`resident` is asked only by the mirror: /metrics reads the counts at scrape time."""
        self.batch_size.observe(rows)
        self.batch_adapters.observe(distinct)
        if self.mirror:
            self.mirror.observe_batch(rows, distinct, resident())

    def exposition(self, resident: dict[str, int] | None = None) -> bytes:
        for tier, count in (resident or {}).items():
            self.resident.labels(tier).set(count)
        import torch  # the model replicas' series only: the Ingress process holds no torch

        if torch.cuda.is_available():
            self.device_memory.set(torch.cuda.memory_allocated())
        return generate_latest(self.registry)


LOAD_HELP = ("Time to bring an adapter into a tier (host: fetch + validate; device: write slots; "
             "merged: regenerate dW and merge).")
SPLIT_HELP = "Batches whose forward pass failed and were retried in halves to find the one failing call."
REJECTED_HELP = "New adapter versions refused on hot-swap (corrupt or invalid); the version in use kept serving."


class ServeReplicaMetrics:
    """The engine's metrics as Ray Serve metrics (tagged with deployment, replica and
    application by Ray), exported from every replica on Ray's metrics port as `ray_dcft_*`."""

    def __init__(self):
        from ray.serve import metrics

        self.batch_size = metrics.Histogram("dcft_batch_size", "Rows per forward pass.", list(SIZE_BUCKETS))
        self.batch_adapters = metrics.Histogram("dcft_batch_distinct_adapters", "Distinct adapters per forward pass.",
                                                list(SIZE_BUCKETS))
        self.bank_events = metrics.Counter("dcft_bank_events", "Adapter bank hits, misses and evictions.",
                                           ("event", "tier"))
        self.load_seconds = metrics.Histogram("dcft_adapter_load_seconds", LOAD_HELP, list(LOAD_BUCKETS), ("tier",))
        self.rejected_versions = metrics.Counter("dcft_rejected_versions", REJECTED_HELP)
        self.batch_splits = metrics.Counter("dcft_batch_splits", SPLIT_HELP)
        self.resident = metrics.Gauge("dcft_bank_resident_adapters", "Adapters resident per tier.", ("tier",))
        self.device_memory = metrics.Gauge("dcft_device_memory_bytes", "Device memory allocated (CUDA) or 0 on CPU.")

    def bank_event(self, event: str, tier: str, value: float) -> None:
        if event == "load_seconds":
            self.load_seconds.observe(value, tags={"tier": tier})
        else:
            self.bank_events.inc(value, tags={"event": event, "tier": tier})

    def observe_batch(self, rows: int, distinct: int, resident: dict[str, int]) -> None:
        self.batch_size.observe(rows)
        self.batch_adapters.observe(distinct)
        for tier, count in resident.items():
            self.resident.set(count, tags={"tier": tier})
        import torch  # the model replicas' series only: the Ingress process holds no torch

        if torch.cuda.is_available():
            self.device_memory.set(torch.cuda.memory_allocated())


class ServeIngressMetrics:
    """The HTTP edge's metrics as Ray Serve metrics (tagged with deployment, replica and
    application by Ray), exported from every Ingress replica on Ray's metrics port as
    `ray_dcft_*`. Labels arrive already bounded by `RequestMetrics`."""

    def __init__(self):
        from ray.serve import metrics

        self.replica = replica_id()
        self.requests = metrics.Counter("dcft_requests", REQUESTS_HELP, ("adapter", "route", "status"))
        self.latency = metrics.Histogram("dcft_request_latency_seconds", LATENCY_HELP, list(LATENCY_BUCKETS),
                                         ("adapter", "route"))
        self.queue_depth = metrics.Gauge("dcft_queue_depth", QUEUE_HELP)
        self.responses = metrics.Counter("dcft_http_responses", RESPONSES_HELP, ("route", "status"))
        self.rate_limited = metrics.Counter("dcft_rate_limited", RATE_LIMITED_HELP, ("tenant", "limit"))

    def observe_request(self, adapter: str, route: str, status: str, seconds: float) -> None:
        self.requests.inc(tags={"adapter": adapter, "route": route, "status": status})
        self.latency.observe(seconds, tags={"adapter": adapter, "route": route})


def replica_id() -> str:
    """This Serve replica's id, the `replica` tag Ray puts on its series ("local" outside Serve)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:
        return "local"
