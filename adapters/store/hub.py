"""A versioned, content-addressed adapter hub on any fsspec store (local, s3, gs, memory).

Layout under the hub root:

    hub.json                                       backbone + format version, written once
    changes                                        a token rewritten after every change (desired_state.py)
    blobs/<digest>/adapter_config.json             content-addressed adapter files
    blobs/<digest>/adapter_model.safetensors
    adapters/<tenant>/<task>/versions/<N>.json     immutable version record -> digest
    adapters/<tenant>/<task>/versions/<N>.removed  tombstone: version N was removed
    placements/<tenant>/<task>.json                the fleet's desired state per name (desired_state.py)

Names live under `adapters/` so no tenant (say "blobs") can collide with hub files.
Fetched adapters are cached locally in `<cache_dir>/<digest>/` (default
`$DCFT_HUB_CACHE` or `~/.cache/dcft-hub`), re-verified against the digest on reuse.

A publish writes the blob first and the version record last, so the record is the
commit point: a reader sees either no version N or a complete one. `latest` is the
highest live N in the listing; there is no mutable pointer that could tear. Records
are never rewritten or deleted, so a version number is never reused, even after
`remove`. Names starting with "." are temp files, ignored by every reader.

How each write is made atomic on local disks and on object stores: `adapters.store.stores`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from adapters.config import AdapterConfig, BaseModelRef
from adapters.errors import (
    AdapterFileError,
    AdapterNotFoundError,
    BaseModelMismatchError,
    RegistryError,
    RegistryUnavailableError,
)
from adapters.store.atomic import write_atomic
from adapters.store.desired_state import ChangeToken, FleetState
from adapters.store.files import (
    CONFIG_NAME,
    MAX_WEIGHTS_BYTES,
    WEIGHTS_NAME,
    adapter_digest,
    read_adapter_config,
    read_adapter_tensors,
    read_bounded,
)
from adapters.store.names import PART, PART_PATTERN, AdapterRef, as_ref, check_part, parse_name
from adapters.store.stores import io_errors, open_store

logger = logging.getLogger(__name__)

HUB_FILE = "hub.json"
HUB_FORMAT_VERSION = 1
BLOB_FILES = (CONFIG_NAME, WEIGHTS_NAME)
_RECORD = re.compile(r"([1-9][0-9]*)\.json", re.ASCII)
_TOMBSTONE = re.compile(r"([1-9][0-9]*)\.removed", re.ASCII)
_MAX_PUBLISH_ATTEMPTS = 1000
_Method = TypeVar("_Method", bound=Callable)


# --- records ---------------------------------------------------------------------------


class AdapterVersion(BaseModel):
    """One published version: the immutable record stored as `versions/<N>.json`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    tenant: str = Field(pattern=f"^{PART_PATTERN}$")
    task: str = Field(pattern=f"^{PART_PATTERN}$")
    version: int = Field(ge=1)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: datetime
    size_bytes: int = Field(ge=0)
    base_model: BaseModelRef

    @model_validator(mode="after")
    def _name_is_tenant_task(self) -> AdapterVersion:
        if self.name != f"{self.tenant}/{self.task}":
            raise ValueError(f"name {self.name!r} is not tenant/task {self.tenant}/{self.task}")
        return self

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


class HubInfo(BaseModel):
    """`hub.json`: which backbone every adapter in this hub must fit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format_version: Literal[1] = HUB_FORMAT_VERSION
    backbone: BaseModelRef
    created_at: datetime


# --- errors and defaults -------------------------------------------------------------


def _reports_io_errors(method: _Method) -> _Method:
    @functools.wraps(method)
    def wrapper(self: AdapterHub, *args, **kwargs):
        with io_errors(self.url, method.__name__):
            return method(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _default_cache_dir() -> Path:
    return Path(os.environ.get("DCFT_HUB_CACHE") or Path.home() / ".cache" / "dcft-hub")


# --- the hub ----------------------------------------------------------------------------


class AdapterHub:
    """Publish, resolve, fetch, list and remove adapters in a hub at `url`."""

    def __init__(self, url: str | os.PathLike[str], cache_dir: str | Path | None = None) -> None:
        self.url = os.fspath(url)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        self._store = open_store(self.url)
        self._info: HubInfo | None = None
        # Watchers poll `changes` to know when to look again; `fleet` is what every replica should hold.
        self.changes = ChangeToken(self._store, self.url)
        self.fleet = FleetState(self._store, self.url, self.changes)

    def __repr__(self) -> str:
        return f"AdapterHub({self.url!r})"

    @classmethod
    def create(
        cls, url: str | os.PathLike[str], backbone: BaseModelRef, cache_dir: str | Path | None = None
    ) -> AdapterHub:
        """Create a hub for `backbone`; idempotent for the same backbone, else BaseModelMismatchError."""
        hub = cls(url, cache_dir)
        with io_errors(hub.url, "create"):
            hub._init_hub(backbone)
        return hub

    @property
    @_reports_io_errors
    def backbone(self) -> BaseModelRef | None:
        """The hub's backbone, or None before the first publish."""
        info = self._read_info()
        return info.backbone if info else None

    # -- publish --

    @_reports_io_errors
    def publish(self, adapter_dir: str | Path, name: str) -> AdapterVersion:
        """Validate `adapter_dir`, store its files by digest and add version N+1 of `name`.

        Publishing bytes identical to the latest version returns that version unchanged.
        """
        ref = parse_name(name)
        with tempfile.TemporaryDirectory(prefix="dcft-publish-") as tmp:
            # Validate, digest and upload one private snapshot, so the bytes that
            # enter the hub are exactly the bytes that were checked.
            snapshot = _snapshot(Path(adapter_dir), Path(tmp))
            config = _validate(snapshot, Path(adapter_dir))
            self._check_backbone(config.base_model, Path(adapter_dir))
            digest = adapter_digest(snapshot)
            self._ensure_blob(digest, snapshot)
            size = sum((snapshot / file).stat().st_size for file in BLOB_FILES)
        return self._commit_version(ref, digest, size, config.base_model)

    def _commit_version(self, ref: AdapterRef, digest: str, size: int, base: BaseModelRef) -> AdapterVersion:
        """Create the next `<N>.json`; on a lost race re-read the listing and try N+1."""
        for _ in range(_MAX_PUBLISH_ATTEMPTS):
            used, live = self._version_numbers(ref)
            if live and (latest := self._read_record(ref, max(live))).digest == digest:
                return latest  # identical to latest: no-op
            record = AdapterVersion(
                name=ref.name, tenant=ref.tenant, task=ref.task, version=max(used, default=0) + 1,
                digest=digest, created_at=datetime.now(UTC), size_bytes=size, base_model=base,
            )
            if self._store.create(_record_path(ref, record.version), record.model_dump_json(indent=2).encode()):
                self.changes.bump()
                return record
        raise RegistryError(f"publish of {ref.name!r}: lost {_MAX_PUBLISH_ATTEMPTS} races for a version number")

    def _ensure_blob(self, digest: str, snapshot: Path) -> None:
        """Upload the blob unless an intact copy is there (a crash may leave a partial one)."""
        with tempfile.TemporaryDirectory(prefix="dcft-check-") as tmp:
            if self._download_verified(digest, Path(tmp)):
                return
        for file in BLOB_FILES:
            self._store.write(f"blobs/{digest}/{file}", (snapshot / file).read_bytes())

    # -- read side --

    @_reports_io_errors
    def resolve(self, ref: str | AdapterRef) -> AdapterVersion:
        """The version record `ref` names (`TENANT/TASK` and `@latest` mean the highest N)."""
        parsed = as_ref(ref)
        self._check_reachable()
        _, live = self._version_numbers(parsed)
        if not live:
            raise AdapterNotFoundError(f"adapter {parsed.name!r} not found in hub {self.url!r}")
        number = max(live) if parsed.version is None else parsed.version
        if number not in live:
            have = ", ".join(map(str, sorted(live)))
            raise AdapterNotFoundError(f"adapter {parsed.name!r} has no version {number} (versions: {have})")
        return self._read_record(parsed, number)

    @_reports_io_errors
    def versions(self, name: str) -> list[AdapterVersion]:
        """Every live version of `name`, oldest first."""
        ref = parse_name(name)
        _, live = self._version_numbers(ref)
        if not live:
            raise AdapterNotFoundError(f"adapter {ref.name!r} not found in hub {self.url!r}")
        return [self._read_record(ref, number) for number in sorted(live)]

    @_reports_io_errors
    def list(self, tenant: str | None = None, all_versions: bool = False) -> list[AdapterVersion]:
        """The latest version of every adapter (of one tenant), or every version."""
        tenants = [check_part(tenant, "tenant", tenant)] if tenant is not None else self._names("adapters")
        found: list[AdapterVersion] = []
        for owner in sorted(tenants):
            for task in sorted(self._names(f"adapters/{owner}")):
                ref = AdapterRef(tenant=owner, task=task)
                _, live = self._version_numbers(ref)
                picked = sorted(live) if all_versions else sorted(live)[-1:]
                found.extend(self._read_record(ref, number) for number in picked)
        return found

    @_reports_io_errors
    def fetch(self, ref: str, dest_dir: str | Path | None = None) -> Path:
        """Copy the adapter's files into `dest_dir` (default: the local cache entry), digest-verified."""
        version = self.resolve(ref)
        cached = self._cached(version)
        if dest_dir is None:
            return cached
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        for file in BLOB_FILES:
            write_atomic(dest / file, (cached / file).read_bytes())
        if _digest_or_none(dest) != version.digest:
            for file in BLOB_FILES:
                (dest / file).unlink(missing_ok=True)
            raise AdapterFileError(f"{dest}: copy of {version.ref} does not match digest {version.digest}")
        return dest

    def _cached(self, version: AdapterVersion) -> Path:
        """`cache/<digest>`, downloaded and verified once, re-verified on every reuse."""
        target = self.cache_dir / version.digest
        if _digest_or_none(target) == version.digest:
            return target
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.cache_dir, prefix=".tmp-") as tmp:
            if not self._download_verified(version.digest, Path(tmp), version.ref):
                raise AdapterFileError(f"blob {version.digest} of {version.ref} is missing from hub {self.url!r}")
            target.mkdir(exist_ok=True)
            for file in BLOB_FILES:
                os.replace(Path(tmp) / file, target / file)  # concurrent fetchers write identical bytes
        return target

    def _download_verified(self, digest: str, dest: Path, ref: str | None = None) -> bool:
        """Download blob `digest` into `dest`; False if absent or (when `ref` is None) corrupt.

        With a `ref`, a corrupt blob raises AdapterFileError instead: it must never be handed out.
        """
        try:
            for file in BLOB_FILES:
                (dest / file).write_bytes(self._store.read(f"blobs/{digest}/{file}"))
        except FileNotFoundError:
            return False
        found = _digest_or_none(dest)
        if found == digest:
            return True
        if ref is None:
            return False
        raise AdapterFileError(f"blob {digest} of {ref} in hub {self.url!r} is corrupted: content digest {found}")

    # -- remove --

    @_reports_io_errors
    def remove(self, ref: str) -> list[AdapterVersion]:
        """Remove `TENANT/TASK@N` (or `@latest`), or every version of a bare `TENANT/TASK`.

        Version numbers are never reused. Blobs no live version references are deleted.
        """
        parsed = AdapterRef.parse(ref)
        removed = [self.resolve(ref)] if "@" in ref else self.versions(parsed.name)
        for version in removed:
            self._store.write(_tombstone_path(parsed, version.version), datetime.now(UTC).isoformat().encode())
        if "@" not in ref and self.fleet.get(parsed):  # nothing left to hold: replicas let it go
            self.fleet.set(parsed.name, "unloaded")
        self.changes.bump()
        self._collect_garbage({version.digest for version in removed})
        return removed

    def _collect_garbage(self, digests: set[str]) -> None:
        # A publisher of the same bytes racing this scan can lose its blob; its fetch then
        # fails loudly (never hands out bad bytes) and re-publishing restores the blob.
        referenced = {version.digest for version in self.list(all_versions=True)}
        for digest in digests - referenced:
            self._store.remove_tree(f"blobs/{digest}")

    # -- hub metadata --

    def _read_info(self) -> HubInfo | None:
        if self._info is None:  # hub.json is written once and never changes
            try:
                raw = self._store.read(HUB_FILE)
            except FileNotFoundError:
                return None
            self._info = _parse_info(raw, self.url)
        return self._info

    def _check_reachable(self) -> None:
        """Once this hub was seen initialised, a missing hub.json means its store is gone
        (unmounted, unreachable), not that it is empty: readers must not drop what they hold."""
        if self._info is None:
            self._read_info()
            return
        try:
            self._store.read(HUB_FILE)
        except FileNotFoundError:
            raise RegistryUnavailableError(f"hub {self.url!r} is unreachable: {HUB_FILE} is gone") from None

    def _init_hub(self, backbone: BaseModelRef) -> HubInfo:
        """Write hub.json unless present (exclusive: concurrent first publishers agree on one)."""
        info = HubInfo(backbone=backbone, created_at=datetime.now(UTC))
        self._store.create(HUB_FILE, info.model_dump_json(indent=2).encode())
        current = self._read_info()
        if current is None:
            raise RegistryError(f"hub {self.url!r}: {HUB_FILE} could not be created")
        if not current.backbone.matches(backbone):
            raise BaseModelMismatchError(
                f"hub {self.url!r} already serves backbone {_describe(current.backbone)}, not {_describe(backbone)}"
            )
        return current

    def _check_backbone(self, base: BaseModelRef, adapter_dir: Path) -> None:
        info = self._read_info() or self._init_hub(base)
        if not info.backbone.matches(base):
            raise BaseModelMismatchError(
                f"adapter {str(adapter_dir)!r} was made for backbone {_describe(base)}, "
                f"but hub {self.url!r} serves backbone {_describe(info.backbone)}"
            )

    # -- listing helpers --

    def _names(self, rel: str) -> list[str]:
        return [entry for entry in self._store.names(rel) if PART.fullmatch(entry)]

    def _version_numbers(self, ref: AdapterRef) -> tuple[set[int], set[int]]:
        """(every N ever used, the live ones); temp files and junk are ignored."""
        entries = self._store.names(f"adapters/{ref.tenant}/{ref.task}/versions")
        used = {int(m[1]) for entry in entries if (m := _RECORD.fullmatch(entry))}
        removed = {int(m[1]) for entry in entries if (m := _TOMBSTONE.fullmatch(entry))}
        return used, used - removed

    def _read_record(self, ref: AdapterRef, number: int) -> AdapterVersion:
        path = _record_path(ref, number)
        try:
            record = AdapterVersion.model_validate_json(self._store.read(path))
        except FileNotFoundError:
            raise AdapterNotFoundError(f"adapter {ref.name!r} has no version {number}") from None
        except ValidationError as err:
            raise RegistryError(f"{self.url}/{path}: corrupt version record: {err.errors()[0]['msg']}") from None
        if (record.name, record.version) != (ref.name, number):
            raise RegistryError(f"{self.url}/{path}: record says {record.ref}, expected {ref.name}@{number}")
        return record


# --- module helpers ---------------------------------------------------------------------


def _record_path(ref: AdapterRef, number: int) -> str:
    return f"adapters/{ref.tenant}/{ref.task}/versions/{number}.json"


def _tombstone_path(ref: AdapterRef, number: int) -> str:
    return f"adapters/{ref.tenant}/{ref.task}/versions/{number}.removed"


def _parse_info(raw: bytes, url: str) -> HubInfo:
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise RegistryError(f"{url}/{HUB_FILE}: not valid JSON") from None
    found = data.get("format_version") if isinstance(data, dict) else None
    if found != HUB_FORMAT_VERSION:
        raise RegistryError(f"{url}/{HUB_FILE}: format_version {found!r}, this dcft-hub reads {HUB_FORMAT_VERSION}")
    try:
        return HubInfo.model_validate(data)
    except ValidationError as err:
        raise RegistryError(f"{url}/{HUB_FILE}: {err.errors()[0]['msg']}") from None


def _describe(backbone: BaseModelRef) -> str:
    return f"{backbone.name!r} (config_digest {backbone.config_digest})"


def _snapshot(adapter_dir: Path, dest: Path) -> Path:
    """Copy the two adapter files into `dest`, refusing missing or oversized ones."""
    for file in BLOB_FILES:
        (dest / file).write_bytes(read_bounded(adapter_dir / file, MAX_WEIGHTS_BYTES))
    return dest


def _validate(snapshot: Path, adapter_dir: Path) -> AdapterConfig:
    """Full read of config and tensors; errors name the user's directory, not the snapshot."""
    try:
        config = read_adapter_config(snapshot)
        read_adapter_tensors(snapshot)
    except AdapterFileError as err:
        raise AdapterFileError(str(err).replace(str(snapshot), str(adapter_dir))) from None
    return config


def _digest_or_none(adapter_dir: Path) -> str | None:
    try:
        return adapter_digest(adapter_dir)
    except AdapterFileError:
        return None
