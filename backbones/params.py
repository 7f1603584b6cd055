"""Trainable-parameter counts of DCFT vs LoRA on a backbone, without loading its weights."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel
from transformers import AutoConfig, AutoModel, PretrainedConfig

from adapters.config import DCFTConfig
from adapters.errors import AdapterConfigError
from adapters.functional import grid_shape
from adapters.targets import find_target_layers, out_in


class ParamCount(BaseModel):
    targets: str
    kernel_size: int
    stride: int
    layers: int
    dcft: int
    lora_rank1: int
    head: int


def load_model_config(source: str | Path) -> PretrainedConfig:
    """A transformers config from a model folder, its config.json, or a shipped alias."""
    from backbones.shipped import ALIASES, resolve_model_dir

    path = resolve_model_dir(source) if str(source) in ALIASES else Path(source)
    if path.is_file():
        path = path.parent
    if not (path / "config.json").is_file():
        raise AdapterConfigError(f"{source}: no config.json (expected a model folder or its config.json)")
    return AutoConfig.from_pretrained(path)


def target_dims(config: PretrainedConfig, targets: list[str]) -> dict[str, tuple[int, int]]:
    """(out, in) of each target layer, from a weightless (meta-device) instance."""
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    layers = find_target_layers(model, targets)
    return {name: out_in(module) for name, module in layers.items()}


def count(config: PretrainedConfig, dcft: DCFTConfig, num_labels: int = 2) -> ParamCount:
    dims = target_dims(config, dcft.targets)
    s, stride, k = dcft.kernel_size, dcft.effective_stride, dcft.rank
    total = 0
    for name, (out_f, in_f) in dims.items():
        try:
            m, n = grid_shape(out_f, in_f, s, stride)
        except ValueError as err:
            raise AdapterConfigError(f"layer '{name}': {err}") from None
        total += k * n + m * k + s * s
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    return ParamCount(
        targets=",".join(dcft.targets), kernel_size=s, stride=stride, layers=len(dims), dcft=total,
        lora_rank1=sum(out_f + in_f for out_f, in_f in dims.values()),
        head=hidden * num_labels + num_labels,
    )
