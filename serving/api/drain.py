"""Graceful shutdown at the edge: stop admitting, let what runs finish within a bound, end what is left.

Serve's own graceful shutdown (`graceful_shutdown_timeout_s` on a deployment) waits for a replica's
requests before stopping it, but only once its app is being deleted: the proxy has dropped the route
by then, so a new request gets the proxy's bare 404, and a stream still running at the bound is cut
without an event. So `dcft serve` drains its apps first (`Ingress.drain`, broadcast to every Ingress
replica) and deletes them after, when Serve's wait finds nothing left to wait for.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from serving.errors import ShuttingDownError

T = TypeVar("T")
POLL_S = 0.05  # how often a drain looks whether anything still runs


class Drain:
    """One edge's shutdown state: whether it drains, the requests it still runs, and its bound.

    Loop-agnostic (no asyncio.Event): each wait makes its own future in its own loop, woken at the bound."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.deadline: float | None = None  # time.monotonic() when the bound passes; None: not draining
        self.bound_passed = False
        self.running = 0  # admitted requests not yet answered in full
        self.ended_by_bound = 0
        self._waiters: set[asyncio.Future] = set()  # requests waiting on the model, woken at the bound

    @property
    def draining(self) -> bool:
        return self.deadline is not None

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """Count one request as running until its answer is out in full."""
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1

    async def drain(self, grace_s: float = 5.0) -> dict[str, int]:
        """Begin draining (once) and wait until nothing runs, or until `grace_s` after the bound
        for the requests it ended to send their last event; say how it went."""
        if self.deadline is None:
            self.deadline = time.monotonic() + self.timeout_s
            asyncio.get_running_loop().call_later(self.timeout_s, self._pass_bound)
        while self.running and time.monotonic() < self.deadline + grace_s:
            await asyncio.sleep(POLL_S)
        return {"ended_by_bound": self.ended_by_bound, "still_running": self.running}

    def _pass_bound(self) -> None:
        self.bound_passed = True
        for waiter in list(self._waiters):
            waiter.get_loop().call_soon_threadsafe(wake, waiter)

    async def first(self, call: Awaitable[T], timeout_s: float) -> T:
        """`call`'s answer; TimeoutError after `timeout_s`; ShuttingDownError once the bound passed."""
        answer, bound = asyncio.ensure_future(call), asyncio.get_running_loop().create_future()
        self._waiters.add(bound)
        if self.bound_passed:
            wake(bound)
        try:
            done, _ = await asyncio.wait({answer, bound}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._waiters.discard(bound)
            bound.cancel()
            if not answer.done():  # a timeout, the bound or the caller's own cancellation
                answer.cancel()
                await asyncio.gather(answer, return_exceptions=True)  # let a stream's generator settle
        if answer in done:
            return answer.result()
        if bound in done:
            self.ended_by_bound += 1
            raise ShuttingDownError(f"the server is shutting down; the request ran past its "
                                    f"{self.timeout_s:g} s drain bound: retry it")
        raise TimeoutError


def wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)
