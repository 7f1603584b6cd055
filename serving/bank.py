"""Where adapters live while a replica serves them: a device tier of stacked slots,
a host-memory tier, and the registry behind both (vLLM's split: placement here,
math in the layers, which only read their `LayerBank` by slot index).

Adapters are keyed by content digest, so two versions of one name are two keys:
a request pins the key it resolved for the whole forward pass, and a hot-swap
never changes the tensors under a batch in flight.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace

import torch

from adapters.config import AdapterConfig
from adapters.errors import AdapterFileError
from adapters.functional import grid_shape
from adapters.layer import LayerBank, SlotBatch
from serving.errors import BankFullError

NONE_SLOT = 0  # all-zero slot: rows without an adapter run the bare backbone


Span = tuple[int, tuple[int, ...]]  # (offset, shape) of one tensor in an adapter's flat buffer


@dataclass(frozen=True)
class PackedLayout:
    """Where each tensor of an adapter sits in its flat buffer."""

    layers: dict[str, tuple[Span, Span, Span]]  # A, B, C per layer
    head: tuple[Span, Span | None] | None  # weight, bias
    numel: int


@functools.lru_cache(maxsize=1024)
def packed_layout(layer_shapes: tuple[tuple[str, tuple[tuple[int, ...], ...]], ...],
                  head_shapes: tuple[tuple[int, ...] | None, ...] | None) -> PackedLayout:
    """One layout object (names, offsets) shared by every adapter of the same shapes."""
    offset = 0

    def span(shape: tuple[int, ...] | None) -> Span | None:
        nonlocal offset
        if shape is None:
            return None
        start, offset = offset, offset + math.prod(shape)
        return start, shape

    layers = {name: tuple(span(shape) for shape in shapes) for name, shapes in layer_shapes}
    head = None if head_shapes is None else tuple(span(shape) for shape in head_shapes)
    return PackedLayout(layers, head, offset)


def _view(flat: torch.Tensor, span: Span) -> torch.Tensor:
    start, shape = span
    return flat[start : start + math.prod(shape)].view(shape)


class LayerViews(Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
    """`layer name -> (A, B, C)`, views into an adapter's flat buffer made on access."""

    def __init__(self, flat: torch.Tensor, spans: dict[str, tuple[Span, Span, Span]]):
        self._flat, self._spans = flat, spans

    def __getitem__(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(_view(self._flat, span) for span in self._spans[name])

    def __contains__(self, name: object) -> bool:  # Mapping's default would build the views
        return name in self._spans

    def __iter__(self) -> Iterator[str]:
        return iter(self._spans)

    def __len__(self) -> int:
        return len(self._spans)


@dataclass(frozen=True)
class HostAdapter:
    """One validated adapter in host memory: DCFT tensors per layer and its head, packed.

    Every tensor lives in one flat buffer and views are made on access, never kept: a
    MiniLM adapter is ~110 small tensors whose object and allocator overhead (~130 KB)
    is four times their data (33 KB), and that overhead is what limits a host tier.
    """

    key: str
    config: AdapterConfig
    flat: torch.Tensor  # (layout.numel,)
    layout: PackedLayout

    @classmethod
    def pack(
        cls, key: str, config: AdapterConfig, layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        head: tuple[torch.Tensor, torch.Tensor | None] | None,
    ) -> HostAdapter:
        tensors = [t for parts in layers.values() for t in parts] + [t for t in head or () if t is not None]
        # the common type of F32/F16/BF16 holds each of them exactly
        dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
        flat = torch.cat([t.reshape(-1).to(dtype) for t in tensors])
        layout = packed_layout(
            tuple((name, tuple(tuple(t.shape) for t in parts)) for name, parts in layers.items()),
            None if head is None else tuple(None if t is None else tuple(t.shape) for t in head),
        )
        return cls(key, config, flat, layout)

    def to(self, dtype: torch.dtype) -> HostAdapter:
        return self if self.flat.dtype == dtype else replace(self, flat=self.flat.to(dtype))

    @property
    def layers(self) -> Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return LayerViews(self.flat, self.layout.layers)

    @property
    def head(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if self.layout.head is None:
            return None
        weight, bias = self.layout.head
        return _view(self.flat, weight), None if bias is None else _view(self.flat, bias)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()


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
        self.layers = {name: self._layer_bank(dims, device_slots + 1) for name, dims in layer_dims.items()}
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

    @property
    def serves_bare(self) -> bool:
        return True  # slot 0 is the bare backbone

    def _layer_bank(self, dims: tuple[int, int], slots: int) -> LayerBank:
        """One wrapped layer's stacked A, B, C and scales; every layer reads `self.batch`'s slot index."""
        grid = grid_shape(*dims, self.kernel_size, self.kernel_size)
        return LayerBank.empty(
            slots, grid, self.kernel_size, self.max_rank, self.batch, device=self.device, dtype=self.dtype
        )

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

    def set_slot_index(self, slot_index: torch.Tensor | None) -> None:
        """The slot of each row of the next forward pass; every wrapped layer reads it."""
        self.batch.slot_index = slot_index

    def release(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in dict.fromkeys(keys):
                self._in_use[key] -= 1
                if self._in_use[key] <= 0:
                    del self._in_use[key]

    def head(self, slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._heads[slot]

    def config(self, key: str) -> AdapterConfig:
        """An adapter's config: from its device slot, else from the host tier (fetched and
        validated there if need be). Never takes a device slot, so it evicts no one."""
        with self._lock:
            if key in self._configs:
                return self._configs[key]
            return self._host_adapter(key).config

    # --- explicit management -----------------------------------------------------

    def load(self, key: str, pin: bool = False) -> None:
        """Bring an adapter onto the device now, and keep it there if pinned (or let it
        be evicted again if not: loading without a pin unpins)."""
        with self._lock:
            self._ensure_on_device(key)
            if pin:
                self._pinned.add(key)
            else:
                self._pinned.discard(key)

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

    def on_device(self) -> tuple[set[str], set[str]]:
        with self._lock:
            return set(self._slot_of), set(self._pinned)

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
        layers = adapter.layers
        for name, bank in self.layers.items():
            if name in layers:
                A, B, C = layers[name]
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
        if self.dtype.itemsize <= adapter.flat.dtype.itemsize:
            # the values a device slot would hold anyway: exact, and half the memory in a bf16 replica
            adapter = adapter.to(self.dtype)
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
