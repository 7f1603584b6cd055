"""The adapter-aware routing policy, choice by choice (the Serve path is in test_fleet.py).

Replicas here are stand-ins carrying what the policy reads of Serve's `RunningReplica`:
an id and the routing stats the replica last reported. Queue lengths go through the
router's own cache, as Serve's probes would fill it.
"""

import asyncio
from collections import Counter
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID  # noqa: E402
from ray.serve.request_router import ReplicaID  # noqa: E402

from serving.calls import ClassifyCall  # noqa: E402
from serving.routing import AdapterAffinityRouter, rendezvous_score  # noqa: E402

DEPLOYMENT = DeploymentID(name="AdapterModel", app_name="routing-test")


def replica(name: str, device=()) -> SimpleNamespace:
    return SimpleNamespace(replica_id=ReplicaID(name, DEPLOYMENT), node_id="node",
                           routing_stats={"device_adapters": list(device)})


def router(affinity=True, max_imbalance=2) -> AdapterAffinityRouter:
    r = AdapterAffinityRouter(DEPLOYMENT, DeploymentHandleSource.UNKNOWN)
    r.initialize_state(affinity=affinity, max_imbalance=max_imbalance)
    return r


def request(adapter: str | None):
    return SimpleNamespace(args=[ClassifyCall(adapter, (("x", None),))] if adapter else [], kwargs={})


def first_choice(r, replicas, adapter) -> list[str]:
    ranks = asyncio.run(r.choose_replicas(replicas, request(adapter)))
    return [x.replica_id.unique_id for x in ranks[0]]


def home_of(adapter: str, names) -> str:
    return max(names, key=lambda n: rendezvous_score(adapter, n))


def test_each_adapter_goes_to_its_home_and_homes_spread_evenly():
    r, replicas = router(), [replica(n) for n in ("a", "b", "c")]
    homes = Counter(first_choice(r, replicas, f"acme/t{i}")[0] for i in range(600))
    assert set(homes) == {"a", "b", "c"} and min(homes.values()) > 150  # about 200 each
    assert first_choice(r, replicas, "acme/t1@3") == [home_of("acme/t1", "abc")]  # versions share a home


def test_a_new_replica_takes_over_only_its_share():
    r = router()
    before = {f"acme/t{i}": first_choice(r, [replica(n) for n in "ab"], f"acme/t{i}")[0] for i in range(300)}
    after = {name: first_choice(r, [replica(n) for n in "abc"], name)[0] for name in before}
    moved = [name for name in before if before[name] != after[name]]
    assert all(after[name] == "c" for name in moved) and 60 < len(moved) < 140  # about a third


def test_an_overloaded_home_spills_to_a_holder_then_to_two_random():
    r = router(max_imbalance=2)
    name = "acme/hot"
    home = home_of(name, "abc")
    holder, other = [n for n in "abc" if n != home]
    replicas = [replica(home, [name]), replica(holder, [name]), replica(other)]
    r.replica_queue_len_cache.update(ReplicaID(home, DEPLOYMENT), 5)
    assert first_choice(r, replicas, name) == [holder]
    r.replica_queue_len_cache.update(ReplicaID(holder, DEPLOYMENT), 5)
    assert len(first_choice(r, replicas, name)) == 2  # power of two choices among all


def test_bare_backbone_calls_and_affinity_off_use_two_random_choices():
    replicas = [replica(n) for n in "abc"]
    assert len(first_choice(router(), replicas, None)) == 2
    seen = {tuple(sorted(first_choice(router(affinity=False), replicas, "acme/t1"))) for _ in range(60)}
    assert len(seen) == 3  # every pair of the three comes up
