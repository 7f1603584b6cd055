"""Several model replicas agreeing on the registry's desired state, and routing by adapter.

Two Serve apps of a tiny BERT on one local Ray instance, two model replicas each:
`/aff` routes each adapter to a replica that holds it (through two Ingress replicas, each
routing alike), `/p2c` uses power of two choices.
"""

import json
import threading

import httpx
import pytest

from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_bert_dir
from benchmarks.harness import free_port
from serving.config import EngineConfig, RoutingConfig, ServeConfig
from tests.serving.traffic import ATOL, RTOL, wait_for

pytestmark = pytest.mark.timeout(600)

KEYS = {"admin-key-0123456789abcdef": "admin"}
ADMIN = {"Authorization": "Bearer admin-key-0123456789abcdef"}
ADAPTERS = [f"acme/task{i}" for i in range(6)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    pytest.importorskip("ray")
    from serving.launch import start, stop

    root = tmp_path_factory.mktemp("fleet")
    bert = tiny_bert_dir(root / "bert")
    adapters = {name: random_adapter(bert, root / name.replace("/", "-"), "seq_cls", seed=seed, kernel=4)
                for seed, name in enumerate(ADAPTERS)}
    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    common = {"num_replicas": 2, "watch_interval_s": 0.3, "max_batch_size": 8, "api_keys_file": str(keys_file)}
    apps, hubs = {}, {}
    for prefix, affinity in (("aff", True), ("p2c", False)):
        hubs[prefix] = hub = AdapterHub(str(root / f"hub-{prefix}"))  # each app its own desired state
        for name, folder in adapters.items():
            hub.publish(folder, name)
        apps[f"/{prefix}"] = ServeConfig(
            engine=EngineConfig(model=str(bert), hub=hub.url, kernel_size=4),
            routing=RoutingConfig(adapter_affinity=affinity, stats_period_s=0.25, converge_timeout_s=20),
            ingress_replicas=2 if affinity else 1, **common,
        )
    base = start(apps, port=free_port(), timeout_s=240, names={prefix: prefix.strip("/") for prefix in apps})
    yield {"base": base, "hubs": hubs}
    stop()


def post(fleet, path, body=None):
    return httpx.post(f"{fleet['base']}{path}", json=body or {}, headers=ADMIN, timeout=60)


def replicas(fleet, app: str) -> list[dict]:
    return httpx.get(f"{fleet['base']}/{app}/v1/admin/status", headers=ADMIN, timeout=30).json()["replicas"]


def classify(fleet, app: str, adapter: str, text: str = "a fine film") -> httpx.Response:
    return post(fleet, f"/{app}/v1/classify", {"adapter": adapter, "inputs": [text]})


def test_both_apps_run_two_replicas(fleet):
    for app in ("aff", "p2c"):
        assert classify(fleet, app, ADAPTERS[0]).status_code == 200
        wait_for(lambda app=app: len(replicas(fleet, app)) == 2, 30, f"two replicas in /{app}'s router")


def test_each_ingress_replica_knows_how_many_share_the_quotas(fleet):
    def sharing(app):
        return httpx.get(f"{fleet['base']}/{app}/v1/admin/status", headers=ADMIN, timeout=30).json()[
            "ingress_replicas_sharing_quotas"]

    assert sharing("p2c") == 1
    wait_for(lambda: all(sharing("aff") == 2 for _ in range(4)), 60, "both Ingress replicas counting two")


def test_a_pin_on_one_replica_reaches_every_replica(fleet):
    r = post(fleet, f"/aff/v1/adapters/{ADAPTERS[1]}/load", {"pin": True})
    assert r.status_code == 200, r.text
    assert r.json()["rollout"]["replicas"] == 2 and r.json()["rollout"]["converged"] == 2
    assert fleet["hubs"]["aff"].fleet.all()[ADAPTERS[1]].state == "pinned"
    wait_for(lambda: all(ADAPTERS[1] in rep.get("pinned", ()) for rep in replicas(fleet, "aff")), 30, "the pin on both")

    r = post(fleet, f"/aff/v1/adapters/{ADAPTERS[1]}/unload")
    assert r.status_code == 200 and r.json()["rollout"]["converged"] == 2
    wait_for(lambda: all(ADAPTERS[1] not in rep.get("device_adapters", ()) for rep in replicas(fleet, "aff")), 30,
             "the adapter off both devices")


def test_a_restarted_replica_comes_up_in_the_same_state(fleet):
    import ray

    assert post(fleet, f"/aff/v1/adapters/{ADAPTERS[2]}/load", {"pin": True}).json()["rollout"]["converged"] == 2
    before = {rep["replica"] for rep in replicas(fleet, "aff")}
    victim = next(a for a in ray.util.list_named_actors(all_namespaces=True) if "aff#AdapterModel" in a["name"])
    ray.kill(ray.get_actor(victim["name"], namespace=victim["namespace"]), no_restart=True)

    def replaced_and_pinned():
        now = replicas(fleet, "aff")
        fresh = [rep for rep in now if rep["replica"] not in before]
        return len(now) == 2 and fresh and all(ADAPTERS[2] in rep.get("pinned", ()) for rep in now)

    wait_for(replaced_and_pinned, 120, "a new replica with the pin")


def spread_of(fleet, app: str) -> dict[str, int]:
    """Adapter -> how many replicas hold it on their device."""
    reps = replicas(fleet, app)
    return {name: sum(name in rep.get("device_adapters", ()) for rep in reps) for name in ADAPTERS[3:]}


def test_affinity_keeps_each_adapter_on_one_replica_where_p2c_spreads_it(fleet):
    for app in ("aff", "p2c"):
        for name in ADAPTERS[3:]:
            post(fleet, f"/{app}/v1/adapters/{name}/unload")
        for _ in range(8):  # one at a time: nothing is overloaded, so nothing spills
            for name in ADAPTERS[3:]:
                assert classify(fleet, app, name).status_code == 200
    # Each replica reports what it holds every 0.25 s: wait until every adapter shows up.
    wait_for(lambda: all(spread_of(fleet, "aff").values()), 30, "affinity's report")
    aff = spread_of(fleet, "aff")
    # 8 requests each, spread at random: all three staying on one replica has odds 1 in 2^21.
    wait_for(lambda: 2 in spread_of(fleet, "p2c").values(), 30, "an adapter on both")
    p2c = spread_of(fleet, "p2c")
    print(f"replicas holding each adapter: affinity {aff}, power of two choices {p2c}")
    assert all(count == 1 for count in aff.values()), aff


def test_concurrent_mixed_adapters_across_replicas_match_each_alone(fleet):
    alone = {name: classify(fleet, "aff", name, "mixed").json()["results"] for name in ADAPTERS}
    answers: list[tuple[str, httpx.Response]] = []

    def send(name):
        answers.append((name, classify(fleet, "aff", name, "mixed")))

    threads = [threading.Thread(target=send, args=(name,)) for name in ADAPTERS * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for _, r in answers] == [200] * len(threads)
    for name, r in answers:
        got, want = r.json()["results"][0]["scores"], alone[name][0]["scores"]
        assert got.keys() == want.keys()
        for label in got:
            assert got[label] == pytest.approx(want[label], rel=RTOL, abs=ATOL)
