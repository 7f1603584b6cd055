"""Serve's autoscaling over real HTTP: steady concurrent load adds a model replica, a light
load afterwards lets it go again, and no request fails or changes its answer on the way.

A tiny random BERT with three adapters, one replica at the start (min 1, max 2), short
autoscaling delays so the whole cycle fits in about a minute on two shared cores.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import Counter

import httpx
import pytest
import torch

from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_bert_dir
from serving.config import AutoscalingSpec, EngineConfig, ServeConfig

pytestmark = pytest.mark.timeout(300)

KEY = "acme-key-0123456789abcdef"
ACME = {"Authorization": f"Bearer {KEY}"}
ADAPTERS = ("acme/one", "acme/two", "acme/three")
# Probabilities from different batch compositions or replicas agree to float32 rounding.
RTOL, ATOL = 1e-5, 1e-6
# Long inputs, several per request: the replica's forward pass, not HTTP, holds the requests.
INPUTS = [f"{text} {text} {text}" for text in (
    "a gripping and funny film with a great cast",
    "dull, overlong and badly written; the plot goes nowhere",
    "the acting is superb but the script is thin",
    "one of the best movies of the year",
)] * 4
CLIENTS = 12  # concurrent senders under load; target_ongoing_requests is 2 per replica
APP = "default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
        base = start({"/": config}, port=free_port(), timeout_s=240)
        yield base
    finally:
        stop()


def running_replicas() -> Counter:
    from ray import serve

    states = serve.status().applications[APP].deployments["AdapterModel"].replica_states
    return Counter({str(state): n for state, n in states.items() if n})


def wait_for(predicate, timeout_s: float, what: str) -> float:
    """Poll `predicate` until true; the seconds it took."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"{what}: not after {timeout_s:.0f} s (replicas {dict(running_replicas())})")
        time.sleep(0.25)
    return time.monotonic() - start


def classify(client: httpx.Client, base: str, adapter: str) -> httpx.Response:
    return client.post(f"{base}/v1/classify", json={"adapter": adapter, "inputs": INPUTS}, headers=ACME)


def same_results(got: list[dict], want: list[dict]) -> None:
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(torch.tensor(list(g["scores"].values())),
                                   torch.tensor(list(w["scores"].values())), rtol=RTOL, atol=ATOL)


class Load:
    """Client threads that send classify requests back to back until told to stop; `active`
    of them send at a time (the others wait), so the load can be lowered without a gap."""

    def __init__(self, base: str, clients: int):
        self.base, self.active = base, clients
        self.stop = threading.Event()
        self.answers: list[tuple[str, httpx.Response]] = []
        self.threads = [threading.Thread(target=self._send, args=(i,)) for i in range(clients)]

    def _send(self, index: int) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                if index >= self.active:
                    self.stop.wait(0.05)
                    continue
                adapter = ADAPTERS[(index + len(self.answers)) % len(ADAPTERS)]
                try:
                    self.answers.append((adapter, classify(client, self.base, adapter)))
                except httpx.HTTPError as err:  # a dropped connection is a failure too
                    self.answers.append((adapter, httpx.Response(599, text=repr(err))))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def test_scales_out_under_load_and_back_in_without_failing_a_request(app):
    with httpx.Client(timeout=60) as client:
        reference = {a: classify(client, app, a).json()["results"] for a in ADAPTERS}  # each alone, one replica
    assert running_replicas() == Counter({"RUNNING": 1})

    started = time.monotonic()
    with Load(app, CLIENTS) as load:
        up = wait_for(lambda: running_replicas()["RUNNING"] == 2, 60, "a second replica under load")
        at_two = len(load.answers)
        wait_for(lambda: len(load.answers) >= at_two + 4 * CLIENTS, 30, "answers from two replicas")
        load.active = 1  # one request in flight at most: below target, a replica goes; traffic never stops
        down = wait_for(lambda: running_replicas() == Counter({"RUNNING": 1}), 60, "back to one replica")
        at_one = len(load.answers)
        wait_for(lambda: len(load.answers) >= at_one + 5, 30, "answers after scaling in")
    elapsed = time.monotonic() - started

    statuses = Counter(r.status_code for _, r in load.answers)
    print(f"autoscaling: 1 -> 2 replicas {up:.1f} s into the load, back to 1 {down:.1f} s after it was lowered; "
          f"{len(load.answers)} answers {dict(statuses)} in {elapsed:.1f} s")
    failed = [(a, r.status_code, r.text[:200]) for a, r in load.answers if r.status_code != 200]
    assert not failed, failed[:5]
    for adapter, answer in load.answers:
        same_results(answer.json()["results"], reference[adapter])
