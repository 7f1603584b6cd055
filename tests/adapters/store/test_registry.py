"""The adapter hub: versioned, content-addressed, atomic on local disks and fsspec stores."""

from __future__ import annotations

import multiprocessing
import os
import selectors
import subprocess
import sys
import time
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from adapters.config import AdapterConfig, BaseModelRef
from adapters.errors import AdapterFileError, AdapterNotFoundError, BaseModelMismatchError, RegistryError
from adapters.store.files import CONFIG_NAME, WEIGHTS_NAME, adapter_digest, write_adapter_dir
from adapters.store.hub import AdapterHub, AdapterVersion
from adapters.store.names import AdapterRef

REPO = Path(__file__).resolve().parents[3]
BACKBONE = BaseModelRef(name="tiny-bert", config_digest="ab" * 16)
OTHER_BACKBONE = BaseModelRef(name="tiny-gpt2", config_digest="cd" * 16)
LAYER = "encoder.layer.0.attention.self.query"


def make_adapter(path: Path, seed: int = 0, backbone: BaseModelRef = BACKBONE) -> Path:
    """A small valid adapter directory whose content depends on `seed`."""
    gen = torch.Generator().manual_seed(seed)
    config = AdapterConfig(base_model=backbone, target_layers=[LAYER], kernel_size=4)
    tensors = {
        f"{LAYER}.dcft_A": torch.randn(1, 8, generator=gen),
        f"{LAYER}.dcft_B": torch.randn(8, 1, generator=gen),
        f"{LAYER}.dcft_C": torch.randn(4, 4, generator=gen),
    }
    return write_adapter_dir(path, config, tensors)


def hub_state(url: str) -> dict[str, bytes]:
    """Every file under the hub root with its bytes: to assert a hub did not change."""
    fs, root = fsspec.core.url_to_fs(url)
    return {path: fs.cat_file(path) for path in sorted(fs.find(root))}


def same_files(a: Path, b: Path) -> bool:
    return all((a / name).read_bytes() == (b / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME))


@pytest.fixture(params=["path", "file-url", "memory"])
def hub_url(request, tmp_path) -> str:
    if request.param == "path":
        return str(tmp_path / "hub")
    if request.param == "file-url":
        return f"file://{tmp_path / 'hub'}"
    return f"memory://hub-{uuid.uuid4().hex}"


@pytest.fixture
def hub(hub_url, tmp_path) -> AdapterHub:
    return AdapterHub.create(hub_url, BACKBONE, cache_dir=tmp_path / "cache")


@pytest.fixture
def adapters_dir(tmp_path) -> Path:
    return tmp_path / "adapters"


# --- publish / resolve / fetch ------------------------------------------------------


def test_round_trip_bytes_identical_and_digest_verified(hub, adapters_dir, tmp_path):
    source = make_adapter(adapters_dir / "a")
    version = hub.publish(source, "acme/sst2")

    assert (version.name, version.tenant, version.task, version.version) == ("acme/sst2", "acme", "sst2", 1)
    assert version.digest == adapter_digest(source)
    assert version.size_bytes == sum((source / name).stat().st_size for name in (CONFIG_NAME, WEIGHTS_NAME))
    assert version.base_model == BACKBONE
    assert hub.resolve("acme/sst2@1") == version

    out = hub.fetch("acme/sst2@1", tmp_path / "out")
    assert out == tmp_path / "out"
    assert same_files(source, out)
    assert adapter_digest(out) == version.digest
    cached = hub.fetch("acme/sst2")  # no dest: the verified cache entry
    assert cached == tmp_path / "cache" / version.digest
    assert same_files(source, cached)


def test_versions_increment_and_latest_is_highest(hub, adapters_dir):
    published = [hub.publish(make_adapter(adapters_dir / str(seed), seed), "acme/sst2") for seed in range(3)]

    assert [v.version for v in published] == [1, 2, 3]
    assert hub.resolve("acme/sst2") == hub.resolve("acme/sst2@latest") == published[-1]
    assert hub.resolve("acme/sst2@1").digest == adapter_digest(adapters_dir / "0")
    assert hub.versions("acme/sst2") == published


def test_identical_republish_is_a_noop(hub, adapters_dir):
    first = hub.publish(make_adapter(adapters_dir / "a", seed=0), "acme/sst2")
    copy = make_adapter(adapters_dir / "copy", seed=0)  # same bytes, another folder

    assert hub.publish(copy, "acme/sst2") == first
    assert [v.version for v in hub.versions("acme/sst2")] == [1]
    # Only the latest counts: going back to older content is a new version (a rollback).
    hub.publish(make_adapter(adapters_dir / "b", seed=1), "acme/sst2")
    assert hub.publish(copy, "acme/sst2").version == 3


def test_first_publish_initialises_the_hub(hub_url, adapters_dir, tmp_path):
    hub = AdapterHub(hub_url, cache_dir=tmp_path / "cache")
    assert hub.backbone is None
    with pytest.raises(AdapterNotFoundError):
        hub.resolve("acme/sst2")
    hub.publish(make_adapter(adapters_dir / "a"), "acme/sst2")

    assert AdapterHub(hub_url).backbone == BACKBONE
    assert AdapterHub.create(hub_url, BACKBONE).backbone == BACKBONE  # idempotent
    with pytest.raises(BaseModelMismatchError, match="tiny-bert.*tiny-gpt2"):
        AdapterHub.create(hub_url, OTHER_BACKBONE)


# --- list / remove ------------------------------------------------------------------


def test_list_latest_per_adapter_and_all_versions(hub, adapters_dir):
    for seed, name in enumerate(["acme/sst2", "acme/sst2", "acme/mnli", "globex/sst2"]):
        hub.publish(make_adapter(adapters_dir / str(seed), seed), name)

    assert [v.ref for v in hub.list()] == ["acme/mnli@1", "acme/sst2@2", "globex/sst2@1"]
    assert [v.ref for v in hub.list("acme")] == ["acme/mnli@1", "acme/sst2@2"]
    assert [v.ref for v in hub.list(all_versions=True)] == [
        "acme/mnli@1",
        "acme/sst2@1",
        "acme/sst2@2",
        "globex/sst2@1",
    ]
    assert hub.list("initech") == []
    with pytest.raises(RegistryError, match="tenant"):
        hub.list("../acme")


def test_remove_one_version_and_never_reuse_its_number(hub, adapters_dir):
    for seed in range(3):
        hub.publish(make_adapter(adapters_dir / str(seed), seed), "acme/sst2")

    assert [v.version for v in hub.remove("acme/sst2@2")] == [2]
    assert [v.version for v in hub.versions("acme/sst2")] == [1, 3]
    with pytest.raises(AdapterNotFoundError, match=r"no version 2 \(versions: 1, 3\)"):
        hub.resolve("acme/sst2@2")
    assert [v.version for v in hub.remove("acme/sst2@latest")] == [3]
    assert hub.resolve("acme/sst2").version == 1
    # A pinned `@3` must never silently come to mean other weights.
    assert hub.publish(make_adapter(adapters_dir / "new", seed=9), "acme/sst2").version == 4


def test_remove_all_versions_and_collect_only_unreferenced_blobs(hub, hub_url, adapters_dir):
    shared = make_adapter(adapters_dir / "shared", seed=0)
    own = make_adapter(adapters_dir / "own", seed=1)
    hub.publish(shared, "acme/sst2")
    hub.publish(own, "acme/sst2")
    hub.publish(shared, "globex/sst2")
    fs, root = fsspec.core.url_to_fs(hub_url)

    assert [v.version for v in hub.remove("acme/sst2")] == [1, 2]
    with pytest.raises(AdapterNotFoundError, match="acme/sst2"):
        hub.resolve("acme/sst2")
    assert [v.ref for v in hub.list()] == ["globex/sst2@1"]
    assert fs.find(f"{root}/blobs/{adapter_digest(own)}") == []  # unreferenced: collected
    assert len(fs.find(f"{root}/blobs/{adapter_digest(shared)}")) == 2  # still used by globex
    assert same_files(shared, hub.fetch("globex/sst2"))
    assert hub.publish(own, "acme/sst2").version == 3


def test_missing_names_raise_not_found_naming_them(hub, adapters_dir, tmp_path):
    hub.publish(make_adapter(adapters_dir / "a"), "acme/sst2")
    for call in (hub.resolve, hub.versions, hub.remove, hub.fetch):
        with pytest.raises(AdapterNotFoundError, match="acme/mnli"):
            call("acme/mnli")
    with pytest.raises(AdapterNotFoundError, match="no version 7"):
        hub.fetch("acme/sst2@7", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- names ------------------------------------------------------------------------------

BAD_NAMES = [
    "../x",
    "acme/..",
    "/abs/x",
    "a/b/c",
    "acme",
    "acme/",
    "/sst2",
    "",
    "A/B",
    "acme/SST2",
    "acme\\sst2",
    "acme/sst2\\..",
    "\u0430cme/sst2",
    "acme/\uff53st2",
    "acme/sst2\n",
    "acme/ss t2",
    ".hidden/sst2",
    "-acme/sst2",
    "acme/_x",
    "x" * 65 + "/sst2",
    "acme/sst2@0",
    "acme/sst2@01",
    "acme/sst2@v1",
    "acme/sst2@-1",
    "acme/sst2@",
    "acme/sst2@1@2",
    "acme//sst2",
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_and_nothing_is_written(name, hub, hub_url, adapters_dir):
    source = make_adapter(adapters_dir / "a")
    before = hub_state(hub_url)
    with pytest.raises(RegistryError, match="bad adapter name|bad version"):
        hub.publish(source, name)
    with pytest.raises(RegistryError):
        hub.resolve(name)
    assert hub_state(hub_url) == before


def test_upper_case_names_get_a_hint():
    with pytest.raises(RegistryError, match="lower-case"):
        AdapterRef.parse("Acme/sst2")


def test_publish_takes_a_name_not_a_version(hub, adapters_dir):
    with pytest.raises(RegistryError, match="without a version"):
        hub.publish(make_adapter(adapters_dir / "a"), "acme/sst2@1")


def test_refs_parse():
    assert AdapterRef.parse("acme/sst2") == AdapterRef(tenant="acme", task="sst2")
    assert AdapterRef.parse("acme/sst2@latest").version is None
    assert str(AdapterRef.parse("acme-co/sst2.v2_x@12")) == "acme-co/sst2.v2_x@12"
    with pytest.raises(ValueError):
        AdapterRef(tenant="..", task="x")  # the model itself refuses what parse refuses


@given(st.text(max_size=80))
def test_any_accepted_name_is_a_safe_path(text):
    try:
        ref = AdapterRef.parse(text)
    except RegistryError:
        return
    for part in (ref.tenant, ref.task):
        assert part.isascii() and part not in (".", "..")
        assert "/" not in part and "\\" not in part and not part.startswith(".")


# --- refusing bad input -------------------------------------------------------------


def test_base_model_mismatch_is_refused_naming_both(hub, hub_url, adapters_dir):
    hub.publish(make_adapter(adapters_dir / "a"), "acme/sst2")
    before = hub_state(hub_url)
    alien = make_adapter(adapters_dir / "alien", backbone=OTHER_BACKBONE)

    with pytest.raises(BaseModelMismatchError) as err:
        hub.publish(alien, "acme/sst2")
    for part in ("tiny-bert", "tiny-gpt2", BACKBONE.config_digest, OTHER_BACKBONE.config_digest):
        assert part in str(err.value)
    assert hub_state(hub_url) == before


def _truncate_weights(path: Path) -> None:
    blob = (path / WEIGHTS_NAME).read_bytes()
    (path / WEIGHTS_NAME).write_bytes(blob[: len(blob) // 2])


def _nan_weights(path: Path) -> None:
    config = AdapterConfig(base_model=BACKBONE, target_layers=[LAYER])
    write_adapter_dir(path, config, {f"{LAYER}.dcft_A": torch.tensor([[float("nan")]])})


BREAKAGES = {
    "weights missing": lambda path: (path / WEIGHTS_NAME).unlink(),
    "config missing": lambda path: (path / CONFIG_NAME).unlink(),
    "weights truncated": _truncate_weights,
    "weights not finite": _nan_weights,
    "config not json": lambda path: (path / CONFIG_NAME).write_text("{oops"),
    "config lacks base_model": lambda path: (path / CONFIG_NAME).write_text('{"target_layers": ["x"]}'),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_broken_adapter_is_refused_and_hub_unchanged(breakage, hub, hub_url, adapters_dir):
    hub.publish(make_adapter(adapters_dir / "good"), "acme/sst2")
    broken = make_adapter(adapters_dir / "broken", seed=1)
    BREAKAGES[breakage](broken)
    before = hub_state(hub_url)

    with pytest.raises(AdapterFileError) as err:
        hub.publish(broken, "acme/sst2")
    assert str(broken) in str(err.value)  # names the user's folder, not a temp copy
    assert hub_state(hub_url) == before


def test_broken_adapter_does_not_initialise_an_empty_hub(hub_url, adapters_dir, tmp_path):
    broken = make_adapter(adapters_dir / "broken")
    _truncate_weights(broken)
    with pytest.raises(AdapterFileError):
        AdapterHub(hub_url, cache_dir=tmp_path / "cache").publish(broken, "acme/sst2")
    assert hub_state(hub_url) == {}


# --- corruption -----------------------------------------------------------------------


def flip_last_byte(fs, path: str) -> None:
    blob = bytearray(fs.cat_file(path))
    blob[-1] ^= 0xFF
    fs.pipe_file(path, bytes(blob))


def test_corrupted_blob_is_refused_on_fetch_and_repaired_by_republish(hub, hub_url, adapters_dir, tmp_path):
    source = make_adapter(adapters_dir / "a")
    version = hub.publish(source, "acme/sst2")
    fs, root = fsspec.core.url_to_fs(hub_url)
    flip_last_byte(fs, f"{root}/blobs/{version.digest}/{WEIGHTS_NAME}")

    with pytest.raises(AdapterFileError, match="corrupted"):
        hub.fetch("acme/sst2", tmp_path / "out")
    assert not (tmp_path / "out" / WEIGHTS_NAME).exists()
    assert not (tmp_path / "cache" / version.digest).exists()
    # The blob check in publish rewrites a damaged blob even when the version is a no-op.
    assert hub.publish(source, "acme/sst2") == version
    assert same_files(source, hub.fetch("acme/sst2", tmp_path / "out"))


def test_missing_blob_is_refused_on_fetch(hub, hub_url, adapters_dir, tmp_path):
    version = hub.publish(make_adapter(adapters_dir / "a"), "acme/sst2")
    fs, root = fsspec.core.url_to_fs(hub_url)
    fs.rm(f"{root}/blobs/{version.digest}", recursive=True)
    with pytest.raises(AdapterFileError, match="missing"):
        hub.fetch("acme/sst2", tmp_path / "out")


def test_corrupted_cache_entry_is_downloaded_again(hub, adapters_dir, tmp_path):
    source = make_adapter(adapters_dir / "a")
    version = hub.publish(source, "acme/sst2")
    cached = hub.fetch("acme/sst2")
    (cached / WEIGHTS_NAME).write_bytes(b"garbage")

    assert same_files(source, hub.fetch("acme/sst2", tmp_path / "out"))
    assert adapter_digest(cached) == version.digest


# --- concurrency and crashes ------------------------------------------------------------


def test_lost_race_for_a_number_takes_the_next_one(hub, hub_url, adapters_dir, tmp_path):
    """Deterministic race: a rival commits N between our listing and our create."""
    hub.publish(make_adapter(adapters_dir / "a", seed=0), "acme/sst2")
    rival = AdapterHub(hub_url, cache_dir=tmp_path / "cache")
    real_create, raced = hub._store.create, []

    def create_after_rival(rel: str, data: bytes) -> bool:
        if not raced:
            raced.append(rival.publish(make_adapter(adapters_dir / "rival", seed=1), "acme/sst2"))
        return real_create(rel, data)

    hub._store.create = create_after_rival
    mine = hub.publish(make_adapter(adapters_dir / "mine", seed=2), "acme/sst2")

    assert (raced[0].version, mine.version) == (2, 3)
    assert hub.resolve("acme/sst2@2").digest == adapter_digest(adapters_dir / "rival")
    assert hub.resolve("acme/sst2@3").digest == adapter_digest(adapters_dir / "mine")


def _publish_all(hub_url: str, cache_dir: str, sources: list[str], barrier) -> None:
    hub = AdapterHub(hub_url, cache_dir=cache_dir)
    barrier.wait(timeout=60)
    for source in sources:
        hub.publish(source, "acme/sst2")


def test_concurrent_publishers_get_distinct_versions(tmp_path, adapters_dir):
    hub_url, workers, each = str(tmp_path / "hub"), 4, 3  # a fresh hub: hub.json races too
    sources = [
        [str(make_adapter(adapters_dir / f"{w}-{i}", seed=w * each + i)) for i in range(each)] for w in range(workers)
    ]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers)
    procs = [
        context.Process(target=_publish_all, args=(hub_url, str(tmp_path / "c"), batch, barrier)) for batch in sources
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=120)
    assert [proc.exitcode for proc in procs] == [0] * workers

    hub = AdapterHub(hub_url, cache_dir=tmp_path / "cache")
    versions = hub.versions("acme/sst2")
    assert [v.version for v in versions] == list(range(1, workers * each + 1))
    by_digest = {adapter_digest(source): source for batch in sources for source in batch}
    assert {v.digest for v in versions} == set(by_digest)
    for version in versions:
        assert same_files(
            Path(by_digest[version.digest]), hub.fetch(version.ref, tmp_path / "out" / str(version.version))
        )


KILLED_PUBLISHER = """
import os, sys, time
from adapters.store.hub import AdapterHub

hub_url, source, cache_dir, step = sys.argv[1:5]

def block(*args, **kwargs):
    print("blocked", flush=True)
    time.sleep(300)

setattr(os, step, block)
AdapterHub(hub_url, cache_dir=cache_dir).publish(source, "acme/sst2")
"""


def _wait_for_line(proc: subprocess.Popen, expected: str, deadline_s: float) -> None:
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            line = proc.stdout.readline()
            if line.strip() == expected:
                return
            assert line, f"publisher exited early: {proc.stderr.read()}"
    raise AssertionError(f"publisher did not print {expected!r} within {deadline_s}s")


@pytest.mark.parametrize(
    ("step", "debris"),
    [("replace", "blobs/*/.tmp-*"), ("link", "adapters/acme/sst2/versions/.tmp-*")],
    ids=["during-blob-write", "before-record-commit"],
)
def test_killed_publisher_leaves_the_hub_as_it_was(step, debris, adapters_dir, tmp_path):
    hub = AdapterHub.create(tmp_path / "hub", BACKBONE, cache_dir=tmp_path / "cache")
    first = make_adapter(adapters_dir / "first", seed=0)
    second = make_adapter(adapters_dir / "second", seed=1)
    hub.publish(first, "acme/sst2")
    before = hub.list(all_versions=True)

    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_PUBLISHER, hub.url, str(second), str(tmp_path / "c"), step],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        _wait_for_line(proc, "blocked", deadline_s=60)
    finally:
        proc.kill()  # SIGKILL: no cleanup handlers run
        proc.wait()
    assert list(Path(hub.url).glob(debris)), "the publisher was not killed half way"

    assert hub.list(all_versions=True) == before
    assert same_files(first, hub.fetch("acme/sst2", tmp_path / "out"))
    later = hub.publish(second, "acme/sst2")
    assert later.version == 2
    assert same_files(second, hub.fetch("acme/sst2@2", tmp_path / "out2"))


def test_records_round_trip_as_json(hub, adapters_dir):
    version = hub.publish(make_adapter(adapters_dir / "a"), "acme/sst2")
    assert AdapterVersion.model_validate_json(version.model_dump_json()) == version
    with pytest.raises(ValueError, match="tenant/task"):
        AdapterVersion.model_validate(version.model_dump() | {"name": "globex/sst2"})


def test_unreachable_store_is_a_registry_error(tmp_path, adapters_dir):
    (tmp_path / "not-a-dir").write_text("a file where the hub should be")
    hub = AdapterHub(tmp_path / "not-a-dir" / "hub", cache_dir=tmp_path / "cache")
    with pytest.raises(RegistryError, match="publish failed"):
        hub.publish(make_adapter(adapters_dir / "a"), "acme/sst2")
    with pytest.raises(RegistryError, match="create failed"):
        AdapterHub.create(tmp_path / "not-a-dir" / "hub", BACKBONE)


def test_newer_hub_format_is_refused(tmp_path, adapters_dir):
    (tmp_path / "hub").mkdir()
    (tmp_path / "hub" / "hub.json").write_text('{"format_version": 2, "backbone": {}}')
    with pytest.raises(RegistryError, match="format_version 2"):
        AdapterHub(tmp_path / "hub").publish(make_adapter(adapters_dir / "a"), "acme/sst2")


# --- the serving fleet's desired state --------------------------------------------------


def test_placements_round_trip_and_move_the_change_token(hub):
    assert hub.fleet.all() == {}
    before = hub.changes.read()
    hub.fleet.set("acme/one", "pinned")
    hub.fleet.set("acme/two@3", "loaded")
    assert hub.changes.read() != before
    placed = hub.fleet.all()
    assert {name: (p.ref, p.state) for name, p in placed.items()} == {
        "acme/one": ("acme/one", "pinned"), "acme/two": ("acme/two@3", "loaded")
    }
    hub.fleet.set("acme/one", "unloaded")  # the latest word per name wins
    assert hub.fleet.all()["acme/one"].state == "unloaded"


def test_a_bad_placement_is_refused_and_a_corrupt_record_skipped(hub, hub_url):
    with pytest.raises(RegistryError):
        hub.fleet.set("not-a-name", "pinned")
    hub.fleet.set("acme/one", "pinned")
    fs, root = fsspec.core.url_to_fs(hub_url)
    fs.pipe_file(f"{root}/placements/acme/two.json", b'{"ref": "acme/two", "state": "everywhere"}')
    fs.pipe_file(f"{root}/placements/acme/three.json", b'{"ref": "globex/other", "state": "pinned", '
                 b'"changed_at": "2026-01-01T00:00:00Z"}')  # a record under another name's path
    assert list(hub.fleet.all()) == ["acme/one"]


def test_removing_an_adapter_unplaces_it(hub, adapters_dir):
    hub.publish(make_adapter(adapters_dir / "a"), "acme/one")
    hub.fleet.set("acme/one", "pinned")
    hub.remove("acme/one")
    assert hub.fleet.all()["acme/one"].state == "unloaded"
