"""What the HTTP edge calls: one protocol, served in-process or through Ray Serve."""

from __future__ import annotations

import asyncio
from typing import Protocol

from adapters.errors import AdapterError
from serving.service import ClassifyCall, ClassifyResult, GenerateCall, GenerateResult, ModelService


class ReplicaUnavailableError(AdapterError):
    """The model replica died or is restarting (503 + Retry-After)."""


class Backend(Protocol):
    async def classify(self, call: ClassifyCall) -> ClassifyResult: ...
    async def generate(self, call: GenerateCall) -> GenerateResult: ...
    async def chat_prompt(self, messages: list[dict[str, str]]) -> str: ...
    async def load(self, ref: str, pin: bool) -> dict: ...
    async def unload(self, ref: str) -> dict: ...
    async def reload(self, name: str | None) -> dict: ...
    async def status(self) -> dict: ...
    async def metrics_text(self) -> bytes: ...


def raise_if_error(result):
    if isinstance(result, AdapterError):
        raise result
    return result


class LocalBackend:
    """The model service in this process (tests, single-process runs); no cross-request batching."""

    def __init__(self, service: ModelService):
        self.service = service
        self._lock = asyncio.Lock()

    async def _run(self, fn, *args):
        async with self._lock:
            return await asyncio.to_thread(fn, *args)

    async def classify(self, call: ClassifyCall) -> ClassifyResult:
        return raise_if_error((await self._run(self.service.classify_many, [call]))[0])

    async def generate(self, call: GenerateCall) -> GenerateResult:
        return raise_if_error((await self._run(self.service.generate_many, [call]))[0])

    async def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self.service.chat_prompt(messages)

    async def load(self, ref: str, pin: bool) -> dict:
        return await self._run(self.service.load, ref, pin)

    async def unload(self, ref: str) -> dict:
        return await self._run(self.service.unload, ref)

    async def reload(self, name: str | None) -> dict:
        return await self._run(self.service.reload, name)

    async def status(self) -> dict:
        return self.service.status()

    async def metrics_text(self) -> bytes:
        return self.service.metrics_text()
