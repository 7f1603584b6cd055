"""What the HTTP edge calls: `ModelService`'s methods by name, run in this process or,
through Ray Serve, on a model replica (`serving.deployment.RayBackend`).

`ModelService` is the protocol: every method the edge calls (`MODEL_METHODS`) takes
plain data and returns plain data or raises one of our `AdapterError`s.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal, Protocol

from serving.service import ModelService

ModelMethod = Literal["classify", "generate", "load", "unload", "reload", "status", "metrics_text"]


class Backend(Protocol):
    async def call(self, method: ModelMethod, *args: Any) -> Any: ...


class LocalBackend:
    """The model service in this process (tests, single-process runs): one call at a
    time in a worker thread, no cross-request batching."""

    def __init__(self, service: ModelService):
        self.service = service
        self._lock = asyncio.Lock()

    async def call(self, method: ModelMethod, *args: Any) -> Any:
        async with self._lock:
            return await asyncio.to_thread(getattr(self.service, method), *args)
