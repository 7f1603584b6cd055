"""A completion, whole or streamed, behind one interface whichever batching the engine runs:

- `StaticCompletions`: the whole answer from one batched decode (`generation.py`), streamed as
  one event per choice;
- `ContinuousCompletions`: the continuous decoder's rows (`decoder.py`), streamed as they decode,
  and collected for a whole answer.

`ModelService` picks one when it starts (the engine has a decoder or not); nothing above it asks
which batching runs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from adapters.errors import AdapterError
from serving.calls import DecodeEvent, GenerateCall, GenerateResult, add_event, events_of, raise_if_error
from serving.decoder import ContinuousDecoder, DecodeRequest
from serving.rows import GenerateRow, Generation


class Completions(Protocol):
    async def complete(self, call: GenerateCall) -> GenerateResult: ...

    def stream(self, call: GenerateCall) -> AsyncIterator[DecodeEvent]:
        """The call's events as they are decoded; closing the iterator early cancels the call."""


class StaticCompletions:
    """`run_batch`: the call's whole answer from a batched decode (Serve's batcher on a replica,
    a thread in one process), or the call's own error as a value."""

    def __init__(self, run_batch: Callable[[GenerateCall], Awaitable[GenerateResult | AdapterError]]):
        self._run_batch = run_batch

    async def complete(self, call: GenerateCall) -> GenerateResult:
        return raise_if_error(await self._run_batch(call))

    async def stream(self, call: GenerateCall) -> AsyncIterator[DecodeEvent]:
        for event in events_of(await self.complete(call)):
            yield event


class ContinuousCompletions:
    """`prepare`: the call's adapter version and its rows, one per prompt (a prompt's n choices
    decode from one prefill), or the call's own error as a value; run in a thread."""

    def __init__(self, decoder: ContinuousDecoder,
                 prepare: Callable[[GenerateCall], tuple[int | None, list[GenerateRow]] | AdapterError]):
        self._decoder, self._prepare = decoder, prepare

    async def complete(self, call: GenerateCall) -> GenerateResult:
        version, requests, events = await self._start(call)
        outs = [Generation() for _ in range(len(requests) * call.n)]
        try:
            async for event in _until_done(events, len(requests) * call.n):
                add_event(outs[event.index], event)
        finally:
            _cancel(requests)
        return GenerateResult(call.adapter, version, outs)

    async def stream(self, call: GenerateCall) -> AsyncIterator[DecodeEvent]:
        _, requests, events = await self._start(call)
        try:
            async for event in _until_done(events, len(requests) * call.n):
                yield event
        finally:
            _cancel(requests)  # a no-op once finished; frees the rows of an abandoned call

    async def _start(self, call: GenerateCall) -> tuple[int | None, list[DecodeRequest], asyncio.Queue]:
        version, rows = raise_if_error(await asyncio.to_thread(self._prepare, call))
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: DecodeEvent) -> None:  # from the decode thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        requests = [DecodeRequest(row.key, row.prompt_ids, row.sampling, emit, call.n, i * call.n, call.tenant)
                    for i, row in enumerate(rows)]
        try:
            for request in requests:
                self._decoder.submit(request)
        except AdapterError:
            _cancel(requests)
            raise
        return version, requests, events


async def _until_done(events: asyncio.Queue, choices: int) -> AsyncIterator[DecodeEvent]:
    """The events of `choices` choices until each has finished; a failed request raises its error."""
    while choices:
        event = await events.get()
        if event.error is not None:
            raise event.error
        choices -= event.finish_reason is not None
        yield event


def _cancel(requests: list[DecodeRequest]) -> None:
    for request in requests:
        request.cancelled.set()
