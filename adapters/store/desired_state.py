"""The serving fleet's desired state, kept in a hub's store beside its versions, and the change token
that tells every watcher when to look again. Layout under the hub root:

    changes                              a token rewritten after every change watchers care about
    placements/<tenant>/<task>.json      what every serving replica should hold for a name: loaded,
                                         pinned or unloaded, rewritten by admin changes

Versions and blobs are `AdapterHub`'s (hub.py); it bumps the same token after each publish and
remove, so one small read per poll tells a replica whether anything moved.
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from adapters.errors import RegistryError
from adapters.store.names import PART, AdapterRef, as_ref
from adapters.store.stores import Store, io_errors

logger = logging.getLogger(__name__)

CHANGES_FILE = "changes"
ServingState = Literal["loaded", "pinned", "unloaded"]


class ChangeToken:
    """A small file rewritten with a fresh token after every change its watchers care about."""

    def __init__(self, store: Store, url: str, path: str = CHANGES_FILE):
        self._store, self.url, self.path = store, url, path

    def read(self) -> str | None:
        """The current token; None before the first change."""
        with io_errors(self.url, "change_token"):
            try:
                return self._store.read(self.path).decode("ascii", "replace")
            except FileNotFoundError:
                return None

    def bump(self) -> None:
        # What changed is committed already: a failure here must not fail it. Watchers also
        # re-read everything now and then, so a lost token only delays them.
        try:
            self._store.write(self.path, uuid.uuid4().hex.encode())
        except OSError:
            logger.warning("store %s: could not update %s; watchers will notice on their next full poll",
                           self.url, self.path)


class DesiredState(BaseModel):
    """The serving fleet's desired state for one adapter name, set by an admin.

    Every replica applies it (loads, pins or unloads the adapter) when the change token
    moves, and a replica that starts later applies all of them before it serves.
    """

    model_config = ConfigDict(extra="forbid")

    ref: str  # TENANT/TASK or TENANT/TASK@N
    state: ServingState
    changed_at: datetime

    @field_validator("ref")
    @classmethod
    def _well_formed(cls, ref: str) -> str:
        try:
            return str(AdapterRef.parse(ref))
        except RegistryError as err:
            raise ValueError(str(err)) from None

    @property
    def adapter(self) -> AdapterRef:
        return AdapterRef.parse(self.ref)

    @property
    def name(self) -> str:
        return self.adapter.name


class FleetState:
    """Every adapter name's desired serving state in one hub's store."""

    def __init__(self, store: Store, url: str, changes: ChangeToken):
        self._store, self.url, self._changes = store, url, changes

    def set(self, ref: str | AdapterRef, state: ServingState) -> DesiredState:
        """Record that every serving replica should hold `ref` loaded, pinned, or not at all."""
        parsed = as_ref(ref)
        desired = DesiredState(ref=str(parsed), state=state, changed_at=datetime.now(UTC))
        with io_errors(self.url, "place"):
            self._store.write(_path(parsed), desired.model_dump_json().encode())
        self._changes.bump()
        return desired

    def all(self) -> dict[str, DesiredState]:
        """Every name's desired state; an unreadable record is skipped (and logged)."""
        found = {}
        with io_errors(self.url, "placements"):
            for tenant in sorted(self._store.names("placements")):
                for entry in sorted(self._store.names(f"placements/{tenant}")):
                    task = entry.removesuffix(".json")
                    readable = task != entry and PART.fullmatch(task) and PART.fullmatch(tenant)
                    if readable and (desired := self.get(AdapterRef(tenant=tenant, task=task))):
                        found[desired.name] = desired
        return found

    def get(self, ref: AdapterRef) -> DesiredState | None:
        """The name's record; None if there is none or it is unreadable (logged)."""
        with io_errors(self.url, "placements"):
            try:
                raw = self._store.read(_path(ref))
            except FileNotFoundError:
                return None
        try:
            desired = DesiredState.model_validate_json(raw)
        except ValidationError:
            logger.warning("hub %s: skipped an unreadable placement record for %s", self.url, ref.name)
            return None
        return desired if desired.name == ref.name else None


def _path(ref: AdapterRef) -> str:
    return f"placements/{ref.tenant}/{ref.task}.json"
