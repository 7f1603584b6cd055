"""Names to versions to validated host tensors: what a replica may load, from where.

The catalog resolves `TENANT/TASK[@N]` against the registry, remembers which
version each name currently means (so a hot-swap is one dictionary update), and
turns a fetched, digest-verified adapter directory into a `HostAdapter` checked
against this replica's backbone before any tensor reaches the device.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from pathlib import Path

import torch

from adapters.config import AdapterConfig, BaseModelRef
from adapters.errors import AdapterFileError, AdapterNotFoundError, BaseModelMismatchError, RegistryUnavailableError
from adapters.store.files import read_adapter_config, read_adapter_tensors
from adapters.store.hub import AdapterHub, AdapterVersion
from adapters.store.loading import check_tensors, expected_dcft_shapes
from adapters.store.names import AdapterRef
from serving.bank import HostAdapter
from serving.model import BackboneShape


def read_host_adapter(
    adapter_dir: Path, key: str, backbone: BaseModelRef, layer_dims: dict[str, tuple[int, int]], hidden_size: int
) -> HostAdapter:
    """Validate an adapter directory against the backbone and split it into layers + head."""
    config = read_adapter_config(adapter_dir)
    if not config.base_model.matches(backbone):
        raise BaseModelMismatchError(
            f"adapter {key[:12]} was made for '{config.base_model.name}' ({config.base_model.config_digest}), "
            f"this replica serves '{backbone.name}' ({backbone.config_digest})"
        )
    tensors = read_adapter_tensors(adapter_dir)
    expected = expected_dcft_shapes(config, layer_dims) | _expected_head(config, tensors, hidden_size)
    check_tensors(tensors, expected, f"adapter {key[:12]}")
    layers = {name: tuple(tensors[f"{name}.dcft_{p}"] for p in "ABC") for name in config.target_layers}
    head = None
    if config.head_modules:
        prefix = config.head_modules[0]
        head = (tensors[f"{prefix}.weight"], tensors.get(f"{prefix}.bias"))
    return HostAdapter.pack(key, config, layers, head)


def _expected_head(config: AdapterConfig, tensors: dict[str, torch.Tensor], hidden: int) -> dict[str, tuple[int, ...]]:
    """Serving applies heads per row as one linear layer: (labels, hidden) weight, optional bias."""
    if config.task_type == "causal_lm":
        return {}
    if len(config.head_modules) != 1:
        raise AdapterFileError(f"a {config.task_type} adapter needs exactly one head module, has {config.head_modules}")
    labels = 1 if config.task_type == "regression" else len(config.labels)
    if labels < 1:
        raise AdapterFileError("a classification adapter must name its labels")
    head = config.head_modules[0]
    expected = {f"{head}.weight": (labels, hidden)}
    if f"{head}.bias" in tensors:
        expected[f"{head}.bias"] = (labels,)
    return expected


class AdapterCatalog:
    """Which version each adapter name currently means, and loading by content key."""

    def __init__(self, hub: AdapterHub, backbone: BackboneShape):
        self.hub, self.backbone = hub, backbone
        self._current: dict[str, AdapterVersion] = {}  # "tenant/task" -> version in use
        self._by_key: dict[str, AdapterVersion] = {}
        self._lock = threading.Lock()

    def resolve(self, ref: AdapterRef) -> AdapterVersion:
        """Pinned refs (`@N`) resolve exactly; bare names stick to the version in use until refresh."""
        with self._lock:
            if ref.version is None and ref.name in self._current:
                return self._current[ref.name]
        version = self._hub_resolve(ref)
        with self._lock:
            if ref.version is None:
                self._current.setdefault(ref.name, version)
                version = self._current[ref.name]
            self._by_key[version.digest] = version
        return version

    def _hub_resolve(self, ref: AdapterRef) -> AdapterVersion:
        """The hub's answer, with errors that name the adapter but not where the hub lives:
        these messages reach HTTP clients, the hub's location must not."""
        try:
            return self.hub.resolve(ref)
        except AdapterNotFoundError:
            raise AdapterNotFoundError(f"adapter '{ref}' not found") from None
        except RegistryUnavailableError:
            raise RegistryUnavailableError("the adapter registry cannot be reached now; retry shortly") from None

    def refresh(self, name: str | None = None) -> dict[str, tuple[AdapterVersion, AdapterVersion]]:
        """{name: (in use, latest)} for names in use whose latest differs. Nothing switches
        here: the caller loads `latest` (validating it) and only then calls `switch`."""
        with self._lock:
            names = [name] if name else list(self._current)
        changed = {}
        for each in names:
            try:
                new = self.hub.resolve(each)
            except AdapterNotFoundError:  # removed from a reachable hub
                self.forget(each)
                continue
            with self._lock:
                old = self._current.get(each)
                self._by_key[new.digest] = new  # loadable by key before anyone uses it
            if old is None or old.digest != new.digest:
                changed[each] = (old, new)
        return changed

    def switch(self, name: str, version: AdapterVersion) -> None:
        """From now on the bare name means `version`."""
        with self._lock:
            self._current[name] = version

    def forget(self, name: str) -> None:
        """`TENANT/TASK` no longer means a version here (it was unloaded, or removed from the hub)."""
        with self._lock:
            self._current.pop(name, None)

    def version_of(self, key: str) -> AdapterVersion:
        return self._by_key[key]

    def names_of(self, keys: Iterable[str]) -> list[str]:
        """The adapter names of these resolved versions, sorted."""
        with self._lock:
            return sorted({self._by_key[key].name for key in keys if key in self._by_key})

    def in_use(self) -> dict[str, AdapterVersion]:
        with self._lock:
            return dict(self._current)

    def load(self, key: str) -> HostAdapter:
        """The bank's loader: fetch (digest-verified) and validate one adapter version."""
        version = self._by_key.get(key)
        if version is None:
            raise AdapterNotFoundError(f"no adapter version with digest {key[:12]} was resolved")
        shape = self.backbone
        return read_host_adapter(self.hub.fetch(version.ref), key, shape.ref, shape.layer_dims, shape.hidden_size)
