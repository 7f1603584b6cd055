"""Serve's autoscaling over real HTTP: steady concurrent load adds a model replica, a light
load afterwards lets it go again, and no request fails or changes its answer on the way.

A tiny random BERT with three adapters, one replica at the start (min 1, max 2), short
autoscaling delays so the whole cycle fits in about a minute on two shared cores.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter

import httpx
import pytest

from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_bert_dir
from benchmarks.harness import free_port
from serving.config import AutoscalingSpec, EngineConfig, ServeConfig
from tests.serving.traffic import Traffic, same_results, wait_for

pytestmark = pytest.mark.timeout(300)

KEY = "acme-key-0123456789abcdef"
ACME = {"Authorization": f"Bearer {KEY}"}
ADAPTERS = ("acme/one", "acme/two", "acme/three")
# Long inputs, several per request: the replica's forward pass, not HTTP, holds the requests.
INPUTS = [f"{text} {text} {text}" for text in (
    "a gripping and funny film with a great cast",
    "dull, overlong and badly written; the plot goes nowhere",
    "the acting is superb but the script is thin",
    "one of the best movies of the year",
)] * 4
CLIENTS = 12  # concurrent senders under load; target_ongoing_requests is 2 per replica
APP = "default"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from serving.launch import start, stop

    root = tmp_path_factory.mktemp("autoscale")
    bert = tiny_bert_dir(root / "bert")
    hub = AdapterHub(str(root / "hub"))
    for seed, name in enumerate(ADAPTERS, start=1):
        hub.publish(random_adapter(bert, root / f"a{seed}", "seq_cls", seed=seed, kernel=4), name)
    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps({KEY: "acme"}))
    config = ServeConfig(
        engine=EngineConfig(model=str(bert), hub=hub.url, kernel_size=4),
        api_keys_file=str(keys_file), watch_interval_s=0.5, max_batch_size=16, replica_num_cpus=1,
        autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=2, target_ongoing_requests=2, upscale_delay_s=1,
                                    downscale_delay_s=4, look_back_period_s=2, metrics_interval_s=0.5),
    )
    # Logical CPUs: the two replicas' one each and room for the controller, proxy and ingress.
    ray.init(num_cpus=3, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        base = start({"/": config}, port=free_port(), timeout_s=240, names={"/": APP})
        yield base
    finally:
        stop()


def running_replicas() -> Counter:
    from ray import serve

    states = serve.status().applications[APP].deployments["AdapterModel"].replica_states
    return Counter({str(state): n for state, n in states.items() if n})


def classify(client: httpx.Client, base: str, adapter: str) -> httpx.Response:
    return client.post(f"{base}/v1/classify", json={"adapter": adapter, "inputs": INPUTS}, headers=ACME)


def test_scales_out_under_load_and_back_in_without_failing_a_request(app):
    with httpx.Client(timeout=60) as client:
        reference = {a: classify(client, app, a).json()["results"] for a in ADAPTERS}  # each alone, one replica
    assert running_replicas() == Counter({"RUNNING": 1})

    started = time.monotonic()
    with Traffic(lambda client, adapter: classify(client, app, adapter), ADAPTERS, CLIENTS) as load:
        up = wait_for(lambda: running_replicas()["RUNNING"] == 2, 60, "a second replica under load")
        at_two = len(load.answers)
        wait_for(lambda: len(load.answers) >= at_two + 4 * CLIENTS, 30, "answers from two replicas")
        load.active = 1  # one request in flight at most: below target, a replica goes; traffic never stops
        down = wait_for(lambda: running_replicas() == Counter({"RUNNING": 1}), 60, "back to one replica")
        at_one = len(load.answers)
        wait_for(lambda: len(load.answers) >= at_one + 5, 30, "answers after scaling in")
    elapsed = time.monotonic() - started

    statuses = Counter(r.status_code for _, _, r in load.answers)
    print(f"autoscaling: 1 -> 2 replicas {up:.1f} s into the load, back to 1 {down:.1f} s after it was lowered; "
          f"{len(load.answers)} answers {dict(statuses)} in {elapsed:.1f} s")
    failed = [(a, r.status_code, r.text[:200]) for _, a, r in load.answers if r.status_code != 200]
    assert not failed, failed[:5]
    for _, adapter, answer in load.answers:
        same_results(answer.json()["results"], reference[adapter])
