"""The adapter name grammar, `TENANT/TASK[@latest|@N]`, and its parsed form `AdapterRef`.

Each part is lower-case ASCII: `[a-z0-9][a-z0-9._-]{0,63}`. Version None means latest.
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field

from adapters.errors import RegistryError

PART_PATTERN = r"[a-z0-9][a-z0-9._-]{0,63}"
PART = re.compile(PART_PATTERN, re.ASCII)


def check_part(part: str, what: str, text: str) -> str:
    """`part` (a tenant or task of the name `text`) if it is well formed, else RegistryError."""
    if not PART.fullmatch(part):
        hint = " (names are lower-case)" if PART.fullmatch(part.lower()) else ""
        raise RegistryError(f"bad adapter name {text!r}: {what} {part!r} must match [a-z0-9][a-z0-9._-]{{0,63}}{hint}")
    return part


class AdapterRef(BaseModel):
    """A parsed `TENANT/TASK[@latest|@N]`; version None means latest."""

    model_config = ConfigDict(frozen=True)

    tenant: str = Field(pattern=f"^{PART_PATTERN}$")
    task: str = Field(pattern=f"^{PART_PATTERN}$")
    version: int | None = Field(None, ge=1)

    @classmethod
    def parse(cls, text: str) -> AdapterRef:
        """Parse and validate a ref; raise RegistryError naming what is wrong."""
        if not isinstance(text, str):
            raise RegistryError(f"adapter ref must be a string, got {type(text).__name__}")
        name, at, tag = text.partition("@")
        parts = name.split("/")
        if len(parts) != 2:
            raise RegistryError(f"bad adapter name {text!r}: expected TENANT/TASK, got {len(parts)} part(s)")
        tenant = check_part(parts[0], "tenant", text)
        task = check_part(parts[1], "task", text)
        if not at or tag == "latest":
            return cls(tenant=tenant, task=task)
        if not re.fullmatch(r"[1-9][0-9]{0,8}", tag, re.ASCII):
            raise RegistryError(f"bad version in {text!r}: expected @latest or @N with N >= 1")
        return cls(tenant=tenant, task=task, version=int(tag))

    @property
    def name(self) -> str:
        return f"{self.tenant}/{self.task}"

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def as_ref(ref: str | AdapterRef) -> AdapterRef:
    """A ref as given: parsed from text (a library caller's), or as it came (parsed at the HTTP edge)."""
    return ref if isinstance(ref, AdapterRef) else AdapterRef.parse(ref)


def parse_name(name: str) -> AdapterRef:
    """A bare `TENANT/TASK`; a version tag is refused."""
    ref = AdapterRef.parse(name)
    if "@" in name:
        raise RegistryError(f"expected an adapter name TENANT/TASK without a version, got {name!r}")
    return ref
