"""What the Serve tests over real HTTP share: client threads keeping load on the app,
polling with a deadline, and comparing classification answers with a stated tolerance."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx
import torch

# Probabilities from different batch compositions or replicas agree to float32 rounding.
RTOL, ATOL = 1e-5, 1e-6


def same_results(got: list[dict], want: list[dict]) -> None:
    """Classification results equal up to float32 rounding (labels exactly)."""
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        if w["scores"] is not None:
            torch.testing.assert_close(torch.tensor(list(g["scores"].values())),
                                       torch.tensor(list(w["scores"].values())), rtol=RTOL, atol=ATOL)


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str) -> float:
    """Poll `predicate` until it holds; the seconds that took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(0.25)
    return time.monotonic() - start


class Traffic:
    """Client threads sending `send(client, adapter)` for each adapter in turn until stopped.
    Only the first `active` threads send (the others idle), so load can drop without a gap.
    A dropped connection is recorded as a 599 answer: a failure like any other."""

    def __init__(self, send: Callable[[httpx.Client, str], httpx.Response], adapters: list[str] | tuple[str, ...],
                 clients: int):
        self.send, self.adapters, self.active = send, adapters, clients
        self.stop = threading.Event()
        self.answers: list[tuple[float, str, httpx.Response]] = []  # (when, adapter, answer)
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(clients)]

    def _run(self, index: int) -> None:
        sent = index
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                if index >= self.active:
                    self.stop.wait(0.05)
                    continue
                adapter = self.adapters[sent % len(self.adapters)]
                sent += 1
                try:
                    answer = self.send(client, adapter)
                except httpx.HTTPError as err:
                    answer = httpx.Response(599, text=repr(err))
                self.answers.append((time.monotonic(), adapter, answer))

    def ok_since(self, since: float) -> set[str]:
        """Adapters answered 200 after `since`."""
        return {a for t, a, r in self.answers if t > since and r.status_code == 200}

    def __enter__(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()
