"""Who gets in: the shared in-flight bound, and each tenant's quota.

A tenant's quota (`LimitsConfig.tenant_quota`, overridden per tenant in
`tenant_quotas`) bounds its requests per second and tokens per minute (token buckets)
and its requests in flight, so one tenant's burst cannot fill the queue the others
share. Tokens are charged after the call, when the model has counted them: a tenant
may overdraw once, and then waits until its bucket is back above zero.

Each Ingress replica admits independently, so with N of them behind Serve's proxies each
enforces 1/N of every quota (`peers`, kept current from Serve's replica count): the
proxies spread requests evenly, so a tenant's total comes to about its quota. The shared
in-flight bound (`max_queued_requests`) stays per replica: it protects that replica.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from serving.api.errors import status_for
from serving.config import LimitsConfig, TenantQuota
from serving.errors import OverloadedError, RateLimitedError
from serving.metrics import RequestMetrics


class TokenBucket:
    """`capacity` tokens, refilled at `rate` per second; the level may go below zero."""

    def __init__(self, rate: float, capacity: float):
        self.rate, self.capacity = rate, capacity
        self.level, self.stamp = capacity, time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_s(self, need: float) -> float:
        """Seconds until `need` tokens are there (0: now)."""
        self._refill()
        return max(0.0, (need - self.level) / self.rate)

    def take(self, count: float) -> None:
        self._refill()
        self.level -= count


def share_of(quota: TenantQuota, share: float) -> TenantQuota:
    """`quota` scaled to one of several replicas' share (never below one request)."""
    if share >= 1:
        return quota

    def part(value: int | None) -> int | None:
        return None if value is None else max(1, math.ceil(value * share))

    return quota.model_copy(update={
        "requests_per_s": quota.requests_per_s and quota.requests_per_s * share, "burst": part(quota.burst),
        "tokens_per_min": part(quota.tokens_per_min), "max_concurrent": part(quota.max_concurrent),
    })


class TenantState:
    def __init__(self, quota: TenantQuota):
        self.in_flight = 0
        self.set_quota(quota)

    def set_quota(self, quota: TenantQuota) -> None:
        """New limits (buckets start full again); requests in flight are kept."""
        self.quota = quota
        self.requests = quota.requests_per_s and TokenBucket(quota.requests_per_s, quota.burst)
        self.tokens = quota.tokens_per_min and TokenBucket(quota.tokens_per_min / 60, quota.tokens_per_min)

    def refusal(self) -> RateLimitedError | None:
        """Why this tenant may not start a request now, or None."""
        limit = self.quota.max_concurrent
        if limit is not None and self.in_flight >= limit:
            message = f"{self.in_flight} requests in flight; this tenant's limit is {limit}"
            return RateLimitedError(message, 1.0, "concurrency")
        if self.requests and (wait := self.requests.wait_s(1)) > 0:
            return RateLimitedError(f"over {self.quota.requests_per_s:g} requests per second", wait, "requests")
        if self.tokens and (wait := self.tokens.wait_s(0)) > 0:
            return RateLimitedError(f"over {self.quota.tokens_per_min} tokens per minute", wait, "tokens")
        return None


class Admission:
    def __init__(self, limits: LimitsConfig, metrics: RequestMetrics):
        self.limits, self.metrics = limits, metrics
        self.in_flight = 0
        self.share = 1.0  # of every tenant's quota this replica enforces
        self.peers = 1  # Ingress replicas admitting requests (set from another thread under Serve)
        self._tenants: dict[str, TenantState] = {}

    def _follow_peers(self) -> None:
        """Each of N Ingress replicas enforces 1/N of every quota; applied here, in the event loop."""
        share = 1 / max(1, self.peers)
        if share != self.share:
            self.share = share
            for name, state in self._tenants.items():
                state.set_quota(self._quota_of(name))

    def _quota_of(self, name: str) -> TenantQuota:
        return share_of(self.limits.tenant_quotas.get(name, self.limits.tenant_quota), self.share)

    def tenant(self, name: str) -> TenantState:
        if name not in self._tenants:
            self._tenants[name] = TenantState(self._quota_of(name))
        return self._tenants[name]

    @asynccontextmanager
    async def admit(self, tenant: str, route: str, adapter: str | None) -> AsyncIterator[Callable[[int], None]]:
        """Hold one in-flight place for the request; yields `charge(tokens)` for its usage.
        Every admitted request is counted and timed by adapter, route and status."""
        if self.in_flight >= self.limits.max_queued_requests:
            raise OverloadedError(f"{self.in_flight} requests in flight; retry shortly")
        self._follow_peers()
        state = self.tenant(tenant)
        if refusal := state.refusal():
            self.metrics.refused(tenant, refusal.limit)
            raise refusal
        if state.requests:
            state.requests.take(1)
        self._enter(state, +1)
        start, status = time.perf_counter(), 500
        try:
            yield lambda tokens: state.tokens and state.tokens.take(tokens)
            status = 200
        except Exception as err:
            status = status_for(err)
            raise
        finally:
            self._enter(state, -1)
            self.metrics.observe_request(adapter, route, status, time.perf_counter() - start)

    def _enter(self, state: TenantState, step: int) -> None:
        state.in_flight += step
        self.in_flight += step
        self.metrics.in_flight(self.in_flight)
