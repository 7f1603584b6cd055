"""Swap `DCFTLinear` wrappers into a transformers model, and back out.

The backbone is frozen; only the DCFT tensors and the listed task-head modules
train. Layer names stay those of the original model (`...query`), so adapter
files read the same whether or not the model is wrapped.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from adapters.config import DCFTConfig, TaskType
from adapters.errors import TargetError
from adapters.functional import grid_shape
from adapters.layer import DCFTLinear, LayerBank
from adapters.targets import find_target_layers, out_in

HEAD_CANDIDATES = ("classifier", "score")  # BERT-likes / decoder-only seq-cls heads


def default_head_modules(model: nn.Module, task_type: TaskType) -> list[str]:
    """The task head that trains and ships with the adapter (none for causal LM)."""
    if task_type == "causal_lm":
        return []
    names = dict(model.named_children())
    return [name for name in HEAD_CANDIDATES if name in names][:1]


def backbone_prefix(model: nn.Module) -> str:
    """ "bert." in BertForSequenceClassification, "model." in LlamaForCausalLM, "" in a bare backbone.

    Adapter files name layers relative to the backbone, so one adapter loads the same
    into a model with a task head (training) and the bare backbone (serving).
    """
    base = getattr(model, "base_model", model)
    return next((name + "." for name, child in model.named_children() if child is base), "")


def exact_targets(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Target patterns that match exactly these backbone-relative layers and nothing else."""
    prefix = backbone_prefix(model)
    return [re.escape(prefix + name) for name in names]


def dcft_layers(model: nn.Module) -> dict[str, DCFTLinear]:
    """Wrapped layers by backbone-relative name."""
    prefix = backbone_prefix(model)
    return {name.removeprefix(prefix): m for name, m in model.named_modules() if isinstance(m, DCFTLinear)}


def _set_module(model: nn.Module, full_name: str, module: nn.Module) -> None:
    parent_name, _, child = full_name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def wrap_layers(
    model: nn.Module, config: DCFTConfig, exclude: Iterable[str] = (), own_adapter: bool = True
) -> list[str]:
    """Wrap every target layer in a DCFTLinear, with its own A, B, C if `own_adapter`.

    Nothing is changed unless every target fits the kernel: the layer that does not
    is named in the error. Without `own_adapter` the layers wait for a bank (serving).
    """
    targets = find_target_layers(model, config.targets, exclude=tuple(exclude))
    _check_kernel_fits(targets, config)
    for name, module in targets.items():
        _set_module(model, name, DCFTLinear(module, config if own_adapter else None))
    prefix = backbone_prefix(model)
    return [name.removeprefix(prefix) for name in targets]


def _check_kernel_fits(targets: dict[str, nn.Module], config: DCFTConfig) -> None:
    for name, module in targets.items():
        try:
            grid_shape(*out_in(module), config.kernel_size, config.effective_stride)
        except ValueError as err:
            raise TargetError(f"layer '{name}': {err}") from None


def inject_adapter(model: nn.Module, config: DCFTConfig, head_modules: Iterable[str] = ()) -> list[str]:
    """Freeze the backbone, add a trainable DCFT adapter, unfreeze the task head."""
    heads = list(head_modules)
    for param in model.parameters():
        param.requires_grad_(False)
    names = wrap_layers(model, config, heads)
    for head in heads:
        for param in model.get_submodule(head).parameters():
            param.requires_grad_(True)
    return names


def remove_adapter(model: nn.Module) -> None:
    """Put every wrapped layer's original module back (unmerging first)."""
    for name, layer in list(model.named_modules()):
        if isinstance(layer, DCFTLinear):
            layer.unmerge()
            _set_module(model, name, layer.base)


@torch.no_grad()
def set_adapter_tensors(model: nn.Module, layers: Mapping[str, tuple[torch.Tensor, ...]]) -> None:
    """Copy A, B, C into every wrapped layer that owns an adapter, by backbone-relative name."""
    for name, layer in dcft_layers(model).items():
        for param, tensor in zip((layer.dcft_A, layer.dcft_B, layer.dcft_C), layers[name], strict=True):
            param.copy_(tensor)


def attach_banks(model: nn.Module, banks: dict[str, LayerBank]) -> None:
    """Give each wrapped layer its bank; rows then pick adapters by the banks' slot index."""
    layers = dcft_layers(model)
    for name, bank in banks.items():
        layers[name].bank = bank


def merge_adapter(model: nn.Module) -> None:
    for layer in dcft_layers(model).values():
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    for layer in dcft_layers(model).values():
        layer.unmerge()


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Counts of trainable parameters: DCFT tensors vs everything else (the head)."""
    dcft = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".dcft_" in n)
    other = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".dcft_" not in n)
    return {"dcft": dcft, "head": other}


def adapter_state(model: nn.Module, head_modules: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds: `<layer>.dcft_{A,B,C}` and the head's parameters."""
    tensors = {}
    for name, layer in dcft_layers(model).items():
        if layer.has_adapter:
            tensors |= {f"{name}.dcft_A": layer.dcft_A, f"{name}.dcft_B": layer.dcft_B, f"{name}.dcft_C": layer.dcft_C}
    for head in head_modules:
        tensors |= {f"{head}.{key}": value for key, value in model.get_submodule(head).state_dict().items()}
    return {name: t.detach() for name, t in tensors.items()}
