"""A replica applies the fleet's desired state from the registry: pins, loads and unloads,
on its watcher's poll and before it serves (a late or restarted replica)."""

import pytest

from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_bert_dir
from serving.calls import ClassifyCall
from serving.config import EngineConfig
from serving.service import ModelService


@pytest.fixture
def hub_and_config(tmp_path):
    bert = tiny_bert_dir(tmp_path / "bert")
    hub = AdapterHub(str(tmp_path / "hub"))
    for seed, name in enumerate(("acme/one", "acme/two")):
        hub.publish(random_adapter(bert, tmp_path / name.replace("/", "-"), "seq_cls", seed=seed, kernel=4), name)
    config = EngineConfig(model=str(bert), hub=hub.url, kernel_size=4, device_slots=4)
    return hub, config, bert, tmp_path


def test_a_pin_placed_in_the_registry_is_applied_on_the_next_poll(hub_and_config):
    hub, config, _, _ = hub_and_config
    service = ModelService(config)
    assert service.routing_stats()["pinned"] == []
    hub.fleet.set("acme/one", "pinned")
    token = service.poll_registry()
    stats = service.routing_stats()
    assert (stats["pinned"], stats["device_adapters"], stats["registry_token"]) == (["acme/one"], ["acme/one"], token)

    hub.fleet.set("acme/one", "unloaded")
    service.poll_registry()
    assert service.routing_stats()["device_adapters"] == []


def test_a_late_replica_comes_up_in_the_fleets_state(hub_and_config):
    hub, config, _, _ = hub_and_config
    hub.fleet.set("acme/one", "pinned")
    hub.fleet.set("acme/two", "loaded")
    late = ModelService(config)  # applied before it serves anything
    stats = late.routing_stats()
    assert stats["pinned"] == ["acme/one"] and stats["device_adapters"] == ["acme/one", "acme/two"]
    assert stats["registry_token"] == hub.changes.read()


def test_a_placement_that_cannot_apply_fails_nothing_else(hub_and_config):
    hub, config, _, _ = hub_and_config
    hub.fleet.set("acme/one", "pinned")
    hub.fleet.set("acme/gone", "pinned")  # names an adapter that was never published
    service = ModelService(config)
    assert service.routing_stats()["pinned"] == ["acme/one"]
    assert len(service.classify(ClassifyCall("acme/two", (("a fine film", None),))).predictions) == 1


def test_a_pin_follows_its_name_to_a_new_version(hub_and_config):
    hub, config, bert, root = hub_and_config
    service = ModelService(config)
    hub.fleet.set("acme/one", "pinned")
    service.poll_registry()
    v2 = hub.publish(random_adapter(bert, root / "one-v2", "seq_cls", seed=9, kernel=4), "acme/one")
    service.poll_registry()
    assert service.status()["adapters"]["acme/one"] == v2.version
    assert service.routing_stats()["pinned"] == ["acme/one"]


def test_a_version_called_by_its_exact_ref_counts_as_held(hub_and_config):
    """A fine-tuned model is always called by its `@N` ref: the routers must still see who holds it."""
    _, config, _, _ = hub_and_config
    service = ModelService(config)
    service.classify(ClassifyCall("acme/two@1", (("a fine film", None),)))
    assert service.routing_stats()["device_adapters"] == ["acme/two"]
    assert service.status()["adapters"] == {}  # the exact ref never became the name's version in use
