"""What the HTTP edge calls: `ModelService`'s methods by name, run in this process or,
through Ray Serve, on a model replica (`serving.deployment.RayBackend`).

`ModelService` is the protocol: every method the edge calls (`MODEL_METHODS`) takes
plain data and returns plain data or raises one of our `AdapterError`s.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any, Literal, Protocol

from serving.fleet import ReplicaView
from serving.service import ModelService

ModelMethod = Literal["classify", "complete", "load", "unload", "reload", "sync", "status", "metrics_text"]
StreamMethod = Literal["stream"]


class Backend(Protocol):
    async def call(self, method: ModelMethod, *args: Any) -> Any: ...

    def stream(self, method: StreamMethod, *args: Any) -> AsyncIterator[Any]:
        """The method's items as they come; closing the iterator cancels the work."""

    async def replicas(self) -> list[ReplicaView]:
        """The live model replicas and what each last reported."""


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
