"""The serving model, built in one place: the frozen backbone, its wrapped target layers,
and where adapters are placed (a mixed `AdapterBank` or a `MergedPlacement`).

The engine and every benchmark that measures the serving path call `build_serving_model`,
so what is measured is what serves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, Protocol, TypeVar

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from adapters.config import AdapterConfig, BaseModelRef, DCFTConfig
from adapters.injection import attach_banks, wrap_layers
from adapters.store.loading import layer_dims
from backbones.loading import backbone_ref, is_causal_lm
from serving.bank import AdapterBank, HostAdapter
from serving.config import EngineConfig
from serving.merged import MergedPlacement

BankEvent = Callable[[str, str, float], None]  # (event, tier, value), e.g. ("hit", "device", 1)


class AdapterPlacement(Protocol):
    """Where a replica's adapters sit while it serves them; what the engine asks of it.

    Keys are content digests. A batch acquires the slots of its rows' keys, runs, and
    releases them; an acquired adapter stays put until released.
    """

    @property
    def serves_bare(self) -> bool:
        """Whether rows without an adapter can run the bare backbone here."""

    def acquire(self, keys: Iterable[str]) -> dict[str, int]: ...

    def release(self, keys: Iterable[str]) -> None: ...

    def set_slot_index(self, slot_index: torch.Tensor | None) -> None:
        """The slot of each row of the next forward pass (None after it)."""

    def head(self, slot: int) -> tuple[torch.Tensor, torch.Tensor | None] | None: ...

    def config(self, key: str) -> AdapterConfig: ...

    def load(self, key: str, pin: bool = False) -> None: ...

    def unload(self, key: str) -> bool: ...

    def resident(self) -> dict[str, int]: ...

    def on_device(self) -> tuple[set[str], set[str]]:
        """(keys on the device now, the pinned ones among them): what routing and status report."""


class AdapterSource(Protocol):
    """Turns a content key into a validated adapter in host memory (the registry, or a fake)."""

    def load(self, key: str) -> HostAdapter: ...


Source = TypeVar("Source", bound=AdapterSource)


@dataclass(frozen=True)
class BackboneShape:
    """What an adapter must fit to be served by this model."""

    ref: BaseModelRef
    layer_dims: dict[str, tuple[int, int]]  # (out, in) of the layers adapters may target here
    hidden_size: int
    is_causal: bool


@dataclass(frozen=True)
class ServingModel(Generic[Source]):
    model: nn.Module  # the bare backbone (with its LM head for a causal LM), frozen, in eval mode
    shape: BackboneShape
    placement: AdapterPlacement
    source: Source


def load_serving_backbone(model_dir: Path, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The backbone without a task head (heads are per adapter), frozen, on `device`."""
    causal = is_causal_lm(AutoConfig.from_pretrained(model_dir, local_files_only=True))
    model_class = AutoModelForCausalLM if causal else AutoModel
    model = model_class.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    return model.to(device).eval().requires_grad_(False)


def build_serving_model(
    model_dir: Path,
    config: EngineConfig,
    source_for: Callable[[BackboneShape], Source],
    device: torch.device,
    dtype: torch.dtype,
    on_event: BankEvent | None = None,
) -> ServingModel[Source]:
    """Load the backbone and place adapters as `config.mode` says; `source_for` is given the
    backbone's shape (what adapters are validated against) and returns where they come from."""
    model = load_serving_backbone(model_dir, device, dtype)
    if config.mode == "merged":
        shape = _shape_of(model, model_dir, layer_dims(model))
        source = source_for(shape)
        return ServingModel(model, shape, MergedPlacement(model, source.load, device, dtype, on_event), source)
    widest = DCFTConfig(kernel_size=config.kernel_size, rank=config.max_rank, targets=config.targets)
    wrapped = wrap_layers(model, widest, own_adapter=False)
    shape = _shape_of(model, model_dir, {name: dims for name, dims in layer_dims(model).items() if name in wrapped})
    source = source_for(shape)
    slots = {"device_slots": config.device_slots, "host_capacity": config.host_capacity}
    bank = AdapterBank(shape.layer_dims, config.kernel_size, config.max_rank, **slots, loader=source.load,
                       device=device, dtype=dtype, on_event=on_event)
    attach_banks(model, bank.layers)
    return ServingModel(model, shape, bank, source)


def _shape_of(model: nn.Module, model_dir: Path, dims: Mapping[str, tuple[int, int]]) -> BackboneShape:
    ref = backbone_ref(model_dir, model.config)
    return BackboneShape(ref, dict(dims), model.config.hidden_size, is_causal_lm(model.config))
