"""Where adapters live while a replica serves them: a device tier of stacked slots,
a host-memory tier, and the registry behind both (vLLM's split: placement here,
math in the layers, which only read their `LayerBank` by slot index).

Adapters are keyed by content digest, so two versions of one name are two keys:
a request pins the key it resolved for the whole forward pass, and a hot-swap
never changes the tensors under a batch in flight.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from adapters.config import AdapterConfig
from adapters.errors import AdapterError, AdapterFileError
from adapters.functional import grid_shape
from adapters.layer import LayerBank, SlotBatch

NONE_SLOT = 0  # all-zero slot: rows without an adapter run the bare backbone


class BankFullError(AdapterError):
    """Every device slot is in use by requests in flight; retry shortly."""


@dataclass(frozen=True)
class HostAdapter:
    """One validated adapter in host memory: DCFT tensors per layer and its head."""

    key: str
    config: AdapterConfig
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    head: tuple[torch.Tensor, torch.Tensor | None] | None  # (weight (labels, hidden), bias)

    @property
    def nbytes(self) -> int:
        tensors = [t for parts in self.layers.values() for t in parts]
        tensors += [t for t in (self.head or ()) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


@dataclass
class BankStats:
    hits: Counter
    misses: Counter
    evictions: Counter
    load_seconds: list[float]


class AdapterBank:
    """Device slots (LRU, pinned while in use) over a host LRU over a loader."""

    def __init__(
        self,
        layer_dims: dict[str, tuple[int, int]],
        kernel_size: int,
        max_rank: int,
        device_slots: int,
        host_capacity: int,
        loader: Callable[[str], HostAdapter],
        device: torch.device,
        dtype: torch.dtype = torch.float32,
        on_event: Callable[[str, str, float], None] | None = None,
    ):
        self.kernel_size, self.max_rank, self.device, self.dtype = kernel_size, max_rank, device, dtype
        self.batch = SlotBatch()
        self.layers = {
            name: LayerBank.empty(
                device_slots + 1,
                grid_shape(out_f, in_f, kernel_size, kernel_size),
                kernel_size,
                max_rank,
                self.batch,
                device=device,
                dtype=dtype,
            )  # fmt: skip
            for name, (out_f, in_f) in layer_dims.items()
        }
        self.device_slots, self.host_capacity = device_slots, host_capacity
        self._loader = loader
        self._on_event = on_event or (lambda event, tier, value: None)
        self._slot_of: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._free = list(range(device_slots, 0, -1))
        self._in_use: Counter[str] = Counter()
        self._pinned: set[str] = set()
        self._heads: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._configs: dict[str, AdapterConfig] = {}
        self._host: OrderedDict[str, HostAdapter] = OrderedDict()
        self._lock = threading.RLock()

    serves_bare = True  # slot 0 is the bare backbone

    # --- what requests use -------------------------------------------------------

    def acquire(self, keys: Iterable[str]) -> dict[str, int]:
        """Slots for these keys, loading as needed; each stays put until released."""
        wanted = list(dict.fromkeys(keys))
        with self._lock:
            if len({k for k in wanted if k not in self._slot_of}) > len(self._free) + self._evictable():
                raise BankFullError(f"{len(wanted)} adapters requested, {self.device_slots} device slots all busy")
            slots = {}
            for key in wanted:
                slots[key] = self._ensure_on_device(key)
                self._in_use[key] += 1
            return slots

    def release(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in dict.fromkeys(keys):
                self._in_use[key] -= 1
                if self._in_use[key] <= 0:
                    del self._in_use[key]

    def head(self, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._heads[slot]

    def config(self, key: str) -> AdapterConfig:
        """The config of a device-resident adapter (acquire it first)."""
        return self._configs[key]

    # --- explicit management -----------------------------------------------------

    def load(self, key: str, pin: bool = False) -> None:
        """Bring an adapter onto the device now (and keep it there if pinned)."""
        with self._lock:
            self._ensure_on_device(key)
            if pin:
                self._pinned.add(key)

    def unload(self, key: str) -> bool:
        """Drop an adapter from both tiers; False if unknown. In-flight users keep it."""
        with self._lock:
            self._pinned.discard(key)
            known = self._host.pop(key, None) is not None
            if key in self._slot_of and not self._in_use[key]:
                self._free_slot(key)
                known = True
            return known

    def resident(self) -> dict[str, int]:
        with self._lock:
            return {"device": len(self._slot_of), "host": len(self._host)}

    def is_on_device(self, key: str) -> bool:
        return key in self._slot_of

    # --- internals ---------------------------------------------------------------

    def _evictable(self) -> int:
        return sum(1 for k in self._slot_of if not self._in_use[k] and k not in self._pinned)

    def _ensure_on_device(self, key: str) -> int:
        if key in self._slot_of:
            self._slot_of.move_to_end(key)
            self._on_event("hit", "device", 1)
            return self._slot_of[key]
        self._on_event("miss", "device", 1)
        adapter = self._host_adapter(key)
        slot = self._free.pop() if self._free else self._evict_one()
        start = time.perf_counter()
        for name, bank in self.layers.items():
            if name in adapter.layers:
                A, B, C = adapter.layers[name]
                bank.write_slot(slot, A, B, C, adapter.config.scale)
            else:  # the adapter leaves this layer alone
                bank.clear_slot(slot)
        if adapter.head is not None:
            weight, bias = adapter.head
            self._heads[slot] = (
                weight.to(self.device, self.dtype),
                None if bias is None else bias.to(self.device, self.dtype),
            )
        self._slot_of[key] = slot
        self._configs[key] = adapter.config
        self._on_event("load_seconds", "device", time.perf_counter() - start)
        return slot

    def _evict_one(self) -> int:
        victim = next((k for k in self._slot_of if not self._in_use[k] and k not in self._pinned), None)
        if victim is None:
            raise BankFullError(f"all {self.device_slots} device slots are pinned or in use")
        self._on_event("eviction", "device", 1)
        return self._free_slot(victim, reuse=True)

    def _free_slot(self, key: str, reuse: bool = False) -> int:
        slot = self._slot_of.pop(key)
        del self._configs[key]
        for bank in self.layers.values():
            bank.clear_slot(slot)
        self._heads.pop(slot, None)
        if not reuse:
            self._free.append(slot)
        return slot

    def _host_adapter(self, key: str) -> HostAdapter:
        if key in self._host:
            self._host.move_to_end(key)
            self._on_event("hit", "host", 1)
            return self._host[key]
        self._on_event("miss", "host", 1)
        start = time.perf_counter()
        adapter = self._loader(key)
        self._check_fits(adapter)
        self._on_event("load_seconds", "host", time.perf_counter() - start)
        self._host[key] = adapter
        while len(self._host) > self.host_capacity:
            evicted, _ = self._host.popitem(last=False)
            self._on_event("eviction", "host", 1)
        return adapter

    def _check_fits(self, adapter: HostAdapter) -> None:
        config = adapter.config
        if config.kernel_size != self.kernel_size or config.effective_stride != self.kernel_size:
            raise AdapterFileError(
                f"adapter {adapter.key[:12]}: kernel {config.kernel_size} stride {config.effective_stride}; this "
                f"replica mixes kernel {self.kernel_size} at stride {self.kernel_size} (serve it from a merged replica)"
            )
        if config.rank > self.max_rank:
            raise AdapterFileError(
                f"adapter {adapter.key[:12]}: rank {config.rank} exceeds the bank's max rank {self.max_rank}"
            )
        unknown = set(adapter.layers) - set(self.layers)
        if unknown:
            raise AdapterFileError(
                f"adapter {adapter.key[:12]}: targets layers this replica does not wrap: {sorted(unknown)[:3]}"
            )
