"""Placement for a replica dedicated to one adapter: W + dW merged into the weights.

On load, dW is regenerated from the adapter's A, B, C by the paper's transposed
convolution and added into each target weight, so a token costs exactly the bare
backbone. Swapping versions is unmerge (exact: the pre-merge weights are kept) then
merge. Both implement `serving.model.AdapterPlacement`, so the engine does not care which it has.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

import torch
from torch import nn

from adapters.config import AdapterConfig
from adapters.errors import AdapterError
from adapters.injection import exact_targets, merge_adapter, remove_adapter, set_adapter_tensors, wrap_layers
from serving.bank import NONE_SLOT, HostAdapter


class MergedPlacement:
    def __init__(
        self,
        model: nn.Module,
        loader: Callable[[str], HostAdapter],
        device: torch.device,
        dtype: torch.dtype,
        on_event: Callable[[str, str, float], None] | None = None,
    ):
        self.model, self.loader, self.device, self.dtype = model, loader, device, dtype
        self._on_event = on_event or (lambda event, tier, value: None)
        self.current: HostAdapter | None = None
        self._head: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._lock = threading.RLock()

    @property
    def serves_bare(self) -> bool:
        return self.current is None

    def set_slot_index(self, slot_index: torch.Tensor | None) -> None:
        """Nothing to set: the merged weights serve every row."""

    def acquire(self, keys: Iterable[str]) -> dict[str, int]:
        wanted = set(keys)
        if len(wanted) > 1:
            raise AdapterError(f"a merged replica serves one adapter per batch, got {len(wanted)}")
        for key in wanted:
            self.load(key)
        return dict.fromkeys(wanted, NONE_SLOT)

    def release(self, keys: Iterable[str]) -> None:
        pass

    def head(self, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._head

    def config(self, key: str) -> AdapterConfig:
        """The merged adapter's config, or another's read from its file (nothing is merged)."""
        with self._lock:
            if self.current is not None and self.current.key == key:
                return self.current.config
        return self.loader(key).config

    def load(self, key: str, pin: bool = False) -> None:
        """Make `key` the merged adapter (unmerging the previous one first)."""
        with self._lock:
            if self.current is not None and self.current.key == key:
                self._on_event("hit", "merged", 1)
                return
            self._on_event("miss", "merged", 1)
            adapter = self.loader(key)  # fetched and validated before the weights are touched
            start = time.perf_counter()
            self.unload_current()
            self._merge(adapter)
            self._on_event("load_seconds", "merged", time.perf_counter() - start)

    def _merge(self, adapter: HostAdapter) -> None:
        exact = adapter.config.dcft.model_copy(update={"targets": exact_targets(self.model, adapter.layers)})
        wrap_layers(self.model, exact)
        set_adapter_tensors(self.model, adapter.layers)
        merge_adapter(self.model)
        self.model.requires_grad_(False)
        if adapter.head is not None:
            weight, bias = adapter.head
            self._head = (
                weight.to(self.device, self.dtype),
                None if bias is None else bias.to(self.device, self.dtype),
            )
        self.current = adapter

    def unload(self, key: str) -> bool:
        with self._lock:
            if self.current is None or self.current.key != key:
                return False
            self.unload_current()
            return True

    def unload_current(self) -> None:
        if self.current is not None:
            remove_adapter(self.model)  # unmerges exactly, then unwraps
            self.current, self._head = None, None

    def resident(self) -> dict[str, int]:
        return {"merged": int(self.current is not None)}

    def on_device(self) -> tuple[set[str], set[str]]:
        with self._lock:
            return ({self.current.key} if self.current else set()), set()
