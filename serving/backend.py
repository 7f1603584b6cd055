"""The model service in this process, behind the edge's `Backend` protocol (`serving/calls.py`);
on Ray Serve replicas the same protocol is `serving.deployment.RayBackend`."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

from serving.calls import ModelMethod, StreamMethod
from serving.fleet import ReplicaView
from serving.service import ModelService


class LocalBackend:
    """The model service in this process (tests, single-process runs): one call at a
    time in a worker thread, no cross-request batching."""

    def __init__(self, service: ModelService):
        self.service = service
        self._lock = asyncio.Lock()

    async def call(self, method: ModelMethod, *args: Any) -> Any:
        function = getattr(self.service, method)
        if inspect.iscoroutinefunction(function):  # runs beside the others (the decoder batches them)
            return await function(*args)
        async with self._lock:
            return await asyncio.to_thread(function, *args)

    def stream(self, method: StreamMethod, *args: Any) -> AsyncIterator[Any]:
        return getattr(self.service, method)(*args)

    async def replicas(self) -> list[ReplicaView]:
        stats = await asyncio.to_thread(self.service.routing_stats)
        return [ReplicaView(self.service.replica_id, "local", stats)]
