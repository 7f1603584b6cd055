"""Admin changes across every model replica.

The registry holds the fleet's desired state (`AdapterHub.place`) and its change token
moves with every change. Each replica catches up with the token on its watcher poll and
reports the token it reached in its routing stats (`serving/routing.py`), so the edge
knows when every live replica has applied a change, with no broadcast of its own.
"""

from __future__ import annotations

import asyncio
import time

from adapters.store.hub import AdapterHub
from serving.calls import Backend

POLL_S = 0.2


async def converge(backend: Backend, hub: AdapterHub, timeout_s: float, detail: bool) -> dict:
    """Wait until every live model replica has caught up with the registry, at most
    `timeout_s`; then say how many have (and, for `detail`, which).

    One replica catches up now; the others on their next watcher poll.
    """
    synced = await backend.call("sync")
    deadline = time.monotonic() + timeout_s
    while True:
        target = await asyncio.to_thread(hub.changes.read)
        replicas = {
            view.replica_id: {"replica": view.replica_id, "node": view.node_id,
                              "converged": view.registry_token == target}
            for view in await backend.replicas()
        }
        if synced["registry_token"] == target and synced["replica"] in replicas:
            replicas[synced["replica"]]["converged"] = True  # its routing stats may not show it yet
        done = sum(r["converged"] for r in replicas.values())
        if (replicas and done == len(replicas)) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(POLL_S)
    rollout = {"replicas": len(replicas), "converged": done}
    if detail:
        rollout["replica_states"] = sorted(replicas.values(), key=lambda r: r["replica"])
    return rollout
