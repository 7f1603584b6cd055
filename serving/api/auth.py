"""API keys -> tenants, and who may touch which adapter.

Keys come from a JSON file ({"key": "tenant"}) or the DCFT_API_KEYS environment
variable ("key1=tenant1,key2=tenant2"), never from code. Only SHA-256 digests of
keys are held, and every lookup compares against all of them in constant time,
so neither timing nor a memory dump gives a key away.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

from adapters.errors import AccessDeniedError, AdapterConfigError
from adapters.store.names import AdapterRef

PUBLIC_TENANT = "public"  # adapters published under public/ are usable by every tenant
ENV_KEYS = "DCFT_API_KEYS"


class UnauthenticatedError(AccessDeniedError):
    """No key, or a key that matches no tenant (HTTP 401)."""


@dataclass(frozen=True)
class Caller:
    tenant: str
    is_admin: bool

    def may_use(self, ref: AdapterRef) -> bool:
        return self.is_admin or ref.tenant in (self.tenant, PUBLIC_TENANT)

    def may_manage(self, ref: AdapterRef) -> bool:
        return self.is_admin or ref.tenant == self.tenant

    def check_use(self, ref: AdapterRef) -> None:
        if not self.may_use(ref):
            raise AccessDeniedError(f"tenant '{self.tenant}' may not use adapter '{ref.name}'")

    def check_manage(self, ref: AdapterRef) -> None:
        if not self.may_manage(ref):
            raise AccessDeniedError(f"tenant '{self.tenant}' may not manage adapter '{ref.name}'")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyRing:
    """Authenticates bearer keys. With no keys configured, every caller is the admin
    (a loopback development setup); configure keys before listening elsewhere."""

    def __init__(self, keys: dict[str, str], admin_tenant: str = "admin"):
        for key, tenant in keys.items():
            if len(key) < 16:
                raise AdapterConfigError(f"API key for tenant '{tenant}' is shorter than 16 characters")
            AdapterRef.parse(f"{tenant}/x")  # tenant names follow adapter naming rules
        self._entries = [(_digest(key), tenant) for key, tenant in keys.items()]
        self.admin_tenant = admin_tenant

    @property
    def open(self) -> bool:
        return not self._entries

    @classmethod
    def from_sources(cls, keys_file: str | None, admin_tenant: str = "admin") -> KeyRing:
        keys: dict[str, str] = {}
        if keys_file:
            try:
                keys |= json.loads(Path(keys_file).read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise AdapterConfigError(f"API keys file {keys_file}: {err}") from None
        for pair in filter(None, os.environ.get(ENV_KEYS, "").split(",")):
            key, _, tenant = pair.strip().partition("=")
            keys[key] = tenant
        return cls(keys, admin_tenant)

    def authenticate(self, authorization: str | None) -> Caller:
        if self.open:
            return Caller(tenant=self.admin_tenant, is_admin=True)
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise UnauthenticatedError("missing 'Authorization: Bearer <key>' header")
        candidate = _digest(key.strip())
        found = None
        for digest, tenant in self._entries:  # no early exit: constant time in the key
            if hmac.compare_digest(candidate, digest):
                found = tenant
        if found is None:
            raise UnauthenticatedError("unknown API key")
        return Caller(tenant=found, is_admin=found == self.admin_tenant)
