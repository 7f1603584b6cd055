"""Faults around the registry: a full disk during publish, an unreachable store under a
serving replica, and a corrupt new version that must never reach the replica.
(A replica killed under load is in tests/serving/test_serve_app.py: it needs Ray.)"""

from __future__ import annotations

import errno
import os
import shutil

import fsspec
import pytest
from fastapi.testclient import TestClient

from adapters.errors import RegistryError
from adapters.store.files import WEIGHTS_NAME
from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_bert_dir
from serving.api.app import create_app
from serving.api.auth import KeyRing
from serving.backend import LocalBackend
from serving.config import EngineConfig, LimitsConfig
from serving.service import ModelService
from tests.adapters.store.test_registry import BACKBONE, flip_last_byte, hub_state, make_adapter, same_files

ADMIN_KEY = "admin-key-0123456789abcdef"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


class FailingFsync:
    """os.fsync that raises ENOSPC on call number `failing` (0: never) and counts calls."""

    def __init__(self, failing: int = 0):
        self.failing, self.calls, self.real = failing, 0, os.fsync

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.calls == self.failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.real(fd)


def test_disk_full_at_any_step_of_a_publish_leaves_no_torn_version(tmp_path, monkeypatch):
    """ENOSPC at each fsync of a publish in turn: the publish fails and the hub is as before,
    or (the record was committed before the failing sync) the hub holds the whole new
    version; a retry completes it or is a no-op."""
    first, second = make_adapter(tmp_path / "first"), make_adapter(tmp_path / "second", seed=1)
    counter = FailingFsync()
    hub = AdapterHub.create(tmp_path / "count", BACKBONE, cache_dir=tmp_path / "count-cache")
    hub.publish(first, "acme/sst2")
    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", counter)
        hub.publish(second, "acme/sst2")
    assert counter.calls >= 3

    for failing in range(1, counter.calls + 1):
        root = tmp_path / f"hub-{failing}"
        hub = AdapterHub.create(root, BACKBONE, cache_dir=tmp_path / f"cache-{failing}")
        hub.publish(first, "acme/sst2")
        before, records_before = hub.list(all_versions=True), version_records(root)
        with monkeypatch.context() as patch:
            patch.setattr(os, "fsync", FailingFsync(failing))
            try:
                hub.publish(second, "acme/sst2")
                raised = False
            except RegistryError as err:
                assert "No space left" in str(err)
                raised = True

        assert not list(root.rglob(".tmp-*")), f"step {failing}: temp files left behind"
        after = hub.list(all_versions=True)
        if after == before:
            assert raised and version_records(root) == records_before
        else:  # the record was linked before its directory sync failed: it is whole
            assert [v.version for v in after] == [1, 2]
            assert same_files(second, hub.fetch("acme/sst2@2", tmp_path / f"out-{failing}"))
        assert hub.publish(second, "acme/sst2").version == 2  # a retry completes, or is a no-op
        assert same_files(first, hub.fetch("acme/sst2@1", tmp_path / f"first-{failing}"))


def version_records(root) -> dict[str, bytes]:
    return {k: v for k, v in hub_state(str(root)).items() if "/versions/" in k}


@pytest.fixture
def served(tmp_path):
    """An in-process app over a hub with two adapters; returns (client, hub, bert dir, root)."""
    bert = tiny_bert_dir(tmp_path / "bert")
    hub = AdapterHub(str(tmp_path / "hub"))
    hub.publish(random_adapter(bert, tmp_path / "a", "seq_cls", seed=1, kernel=4), "acme/one")
    hub.publish(random_adapter(bert, tmp_path / "b", "seq_cls", seed=2, kernel=4), "acme/two")
    service = ModelService(EngineConfig(model=str(bert), hub=hub.url, kernel_size=4))
    app = create_app(LocalBackend(service), KeyRing({ADMIN_KEY: "admin"}), LimitsConfig(), hub, "bert")
    with TestClient(app) as client:
        yield client, hub, bert, tmp_path


def classify(client, adapter: str):
    return client.post("/v1/classify", json={"adapter": adapter, "inputs": ["a fine film"]}, headers=ADMIN)


def reload_all(client):
    return client.post("/v1/adapters/reload", headers=ADMIN)


def test_unreachable_registry_keeps_resident_adapters_serving(served):
    client, hub, _, root = served
    reference = classify(client, "acme/one").json()["results"]
    shutil.move(root / "hub", root / "hub-away")  # the store vanishes (unmounted, bucket down)

    assert classify(client, "acme/one").json()["results"] == reference
    assert reload_all(client).status_code == 503  # the watcher's poll fails, loudly and harmlessly
    assert classify(client, "acme/one").json()["results"] == reference
    unloaded = classify(client, "acme/two")
    assert unloaded.status_code == 503 and unloaded.json()["error"]["code"] == "registry_unavailable"
    assert unloaded.headers["Retry-After"]

    shutil.move(root / "hub-away", root / "hub")
    assert classify(client, "acme/two").status_code == 200
    assert classify(client, "acme/one").json()["results"] == reference


def corrupt_blob(hub: AdapterHub, digest: str) -> None:
    fs, base = fsspec.core.url_to_fs(hub.url)
    flip_last_byte(fs, f"{base}/blobs/{digest}/{WEIGHTS_NAME}")


def test_a_corrupt_new_version_never_reaches_the_replica(served):
    client, hub, bert, root = served
    v1 = classify(client, "acme/one").json()
    bad = hub.publish(random_adapter(bert, root / "v2", "seq_cls", seed=7, kernel=4), "acme/one")
    corrupt_blob(hub, bad.digest)

    swap = client.post("/v1/adapters/acme/one/reload", headers=ADMIN)
    assert swap.status_code == 422 and "corrupt" in swap.json()["error"]["message"]
    assert reload_all(client).json()["changed"] == {}  # the poll refuses it too, and goes on
    still = classify(client, "acme/one").json()
    assert (still["version"], still["results"]) == (1, v1["results"])
    metrics = client.app.state.edge.backend.service.metrics_text().decode()  # the model's series, not the edge's
    assert "dcft_rejected_versions_total 2.0" in metrics

    good = hub.publish(random_adapter(bert, root / "v3", "seq_cls", seed=8, kernel=4), "acme/one")
    assert reload_all(client).json()["changed"] == {"acme/one": [1, good.version]}
    assert classify(client, "acme/one").json()["version"] == good.version


def test_the_watcher_reads_one_token_and_resolves_only_when_it_moves(tmp_path, monkeypatch):
    bert = tiny_bert_dir(tmp_path / "bert")
    hub = AdapterHub(str(tmp_path / "hub"))
    hub.publish(random_adapter(bert, tmp_path / "a", "seq_cls", seed=1, kernel=4), "acme/one")
    service = ModelService(EngineConfig(model=str(bert), hub=hub.url, kernel_size=4))
    service.load("acme/one")
    resolves = []
    real_resolve = hub.resolve
    monkeypatch.setattr(service.engine.catalog.hub, "resolve", lambda ref: resolves.append(ref) or real_resolve(ref))

    token = service.registry_token  # caught up when it started
    assert token == hub.changes.read()
    assert service.poll_registry() == token and resolves == []  # quiet hub: no resolve
    assert service.poll_registry(full=True) == token and resolves == ["acme/one"]

    v2 = hub.publish(random_adapter(bert, tmp_path / "b", "seq_cls", seed=2, kernel=4), "acme/one")
    assert service.poll_registry() != token
    assert service.status()["adapters"] == {"acme/one": v2.version}
