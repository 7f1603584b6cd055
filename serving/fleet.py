"""The live model replicas as this process's request routers see them.

Serve hands every router each replica's routing stats (`ModelService.routing_stats`); the
ingress reads them here to know which replicas are live and what each has applied. The
router registers itself in this module rather than its own: Serve ships a router class
by value, module globals and all, so only an imported module's state is shared.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ReplicaView:
    """One live model replica: its id, node and last `ModelService.routing_stats()`."""

    replica_id: str
    node_id: str
    stats: dict = field(default_factory=dict)

    @property
    def registry_token(self) -> str | None:
        return self.stats.get("registry_token")


class ReplicaSource(Protocol):
    def views(self) -> list[ReplicaView]: ...


_routers: weakref.WeakValueDictionary[str, ReplicaSource] = weakref.WeakValueDictionary()


def track(app_name: str, router: ReplicaSource) -> None:
    """Called by a router of `app_name`'s model deployment as it starts."""
    _routers[app_name] = router


def live_replicas(app_name: str) -> list[ReplicaView] | None:
    """The model replicas this process's router for `app_name` knows (None: no router yet)."""
    router = _routers.get(app_name)
    return router.views() if router is not None else None
