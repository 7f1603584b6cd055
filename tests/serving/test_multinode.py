"""The Serve app on a real Ray cluster of four nodes on this machine (benchmarks/cluster.py):
a head with the controller, the proxy and the Ingress, and three one-CPU workers, two of
them holding a model replica each. A worker holding a replica is lost under load: clients
see only answers or clean 503s, the replica comes back on the spare worker with the
adapters the admin pinned, and reloads the others from the registry as traffic asks.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import httpx
import pytest

from adapters.store.hub import AdapterHub
from benchmarks.cluster import LocalCluster, app_name, free_port
from benchmarks.fixtures import random_adapter, tiny_bert_dir
from serving.config import EngineConfig, RoutingConfig, ServeConfig
from tests.serving.traffic import Traffic, same_results, wait_for

pytestmark = pytest.mark.timeout(400)

KEYS = {"acme-key-0123456789abcdef": "acme", "admin-key-0123456789abcdef": "admin"}
ACME, ADMIN = ({"Authorization": f"Bearer {k}"} for k in KEYS)
ADAPTERS = ("acme/one", "acme/two", "acme/three", "acme/four")
PINNED = "acme/one"
INPUTS = ["a gripping and funny film with a great cast", "the acting is superb but the script is thin"]
APP = app_name("/")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("multinode")
    bert = tiny_bert_dir(root / "bert")
    hub = AdapterHub(str(root / "hub"))
    for seed, name in enumerate(ADAPTERS, start=1):
        hub.publish(random_adapter(bert, root / f"a{seed}", "seq_cls", seed=seed, kernel=4), name)
    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    config = ServeConfig(
        engine=EngineConfig(model=str(bert), hub=hub.url, kernel_size=4),
        api_keys_file=str(keys_file), watch_interval_s=0.5, max_batch_size=16,
        num_replicas=2, replica_num_cpus=1,
        # Spill early: both replicas take every adapter's traffic, so the new one loads them too.
        routing=RoutingConfig(max_imbalance=1, stats_period_s=0.5),
    )
    with LocalCluster(workers=3, worker_cpus=1) as local:
        base = local.serve({"/": config}, port=free_port())
        yield {"local": local, "base": base, "hub": hub}


def classify(client: httpx.Client, base: str, adapter: str) -> httpx.Response:
    return client.post(f"{base}/v1/classify", json={"adapter": adapter, "inputs": INPUTS}, headers=ACME)


def admin_replicas(base: str) -> list[dict]:
    answer = httpx.get(f"{base}/v1/admin/status", headers=ADMIN, timeout=30)
    return answer.json()["replicas"] if answer.status_code == 200 else []


def running_replicas() -> int:
    from ray import serve

    states = serve.status().applications[APP].deployments["AdapterModel"].replica_states
    return sum(n for state, n in states.items() if str(state) == "RUNNING")


def test_a_lost_node_costs_only_retryable_errors_and_its_replica_returns_on_a_spare(cluster):
    local, base, hub = cluster["local"], cluster["base"], cluster["hub"]
    started = time.monotonic()
    workers = set(local.worker_node_ids())
    before = local.replica_nodes(APP)
    assert len(before) == 2 and len(set(before.values())) == 2, f"one replica per node: {before}"
    assert set(before.values()) <= workers, "model replicas run on the worker nodes, not the head"
    assert set(local.replica_nodes(APP, "Ingress").values()) == {local.head_node_id}, "the Ingress stays on the head"

    with httpx.Client(timeout=60) as client:
        reference = {a: classify(client, base, a).json()["results"] for a in ADAPTERS}
        pinned = client.post(f"{base}/v1/adapters/{PINNED}/load", json={"pin": True}, headers=ADMIN)
    assert pinned.status_code == 200, pinned.text
    assert pinned.json()["rollout"]["replicas"] == 2 and pinned.json()["rollout"]["converged"] == 2, pinned.json()
    old_replicas = {r["replica"] for r in admin_replicas(base)}
    assert len(old_replicas) == 2

    with Traffic(lambda client, adapter: classify(client, base, adapter), ADAPTERS, clients=6) as load:
        wait_for(lambda: len(load.answers) >= 20, 30, "traffic flowing before the node loss")
        lost_node = sorted(before.values())[0]
        lost_at = time.monotonic()
        dead_after = local.remove_node(lost_node)

        def replaced() -> bool:
            nodes = local.replica_nodes(APP)
            live = local.live_node_ids()
            return (running_replicas() == 2 and len(nodes) == 2 and len(set(nodes.values())) == 2
                    and set(nodes.values()) <= live and lost_node not in nodes.values())

        back = wait_for(replaced, 90, "a second replica on a live node")

        def new_replica() -> dict:
            return next((r for r in admin_replicas(base) if r["replica"] not in old_replicas), {})

        wait_for(lambda: PINNED in new_replica().get("pinned", ()), 30, "the new replica in the admin status, pinned")
        recovered_at = time.monotonic()
        wait_for(lambda: load.ok_since(recovered_at) == set(ADAPTERS), 30, "every adapter answered after recovery")
        # Traffic spills to it: adapters other than the pinned one come to it from the registry.
        wait_for(lambda: len(new_replica().get("device_adapters", ())) > 1, 30, "adapters loaded on the new replica")
        new = new_replica()
    after = local.replica_nodes(APP)
    elapsed = time.monotonic() - started

    statuses = Counter(r.status_code for _, _, r in load.answers)
    print(f"multinode: node dead {dead_after:.1f} s after its loss, replica back {back:.1f} s after it; "
          f"answers {dict(statuses)}; new replica holds {new['device_adapters']}; {elapsed:.1f} s")
    assert set(statuses) <= {200, 503}, f"only answers or clean retry-later errors, got {dict(statuses)}"
    for _, adapter, answer in load.answers:
        if answer.status_code == 503:
            assert answer.headers.get("Retry-After"), answer.text
        else:
            same_results(answer.json()["results"], reference[adapter])
    assert set(after.values()) & set(before.values()) and lost_node not in after.values()
    assert set(after.values()) - set(before.values()) <= workers, "the replica returned on the spare worker"
    assert new["node"] in set(after.values()) and PINNED in new["pinned"]
    assert new["registry_token"] == hub.changes.read()
    assert any(t > lost_at and r.status_code == 200 for t, _, r in load.answers)
