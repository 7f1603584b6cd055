"""The flooding tenant of the fairness benchmark, run in a process of its own (spawned:
this module imports only what the HTTP clients need, so the process starts in a moment)."""

from __future__ import annotations

import threading

import httpx


def flood(base: str, tenant: str, key: str, clients: int, texts: list[str], polite: bool, started, stop,
          results) -> None:
    """`clients` closed-loop clients of `tenant` (run in a process of its own, so the flood's
    Python work does not hold the victim's GIL). A polite client waits `Retry-After` after a
    429, as the openai client does; an impolite one sends again at once."""
    statuses: list[int] = []

    def loop(offset: int) -> None:
        with httpx.Client() as client:
            i = offset
            while not stop.is_set():
                answer = client.post(f"{base}/v1/classify", json={"adapter": f"{tenant}/reviews",
                                     "inputs": [texts[i % len(texts)]]},
                                     headers={"Authorization": f"Bearer {key}"}, timeout=120)
                statuses.append(answer.status_code)
                started.set()
                if polite and answer.status_code == 429:
                    stop.wait(float(answer.headers.get("retry-after", "1")))
                i += 1

    threads = [threading.Thread(target=loop, args=(n,)) for n in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put(statuses)
