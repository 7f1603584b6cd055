"""Save an adapter from a model, and load one into a model, checked before any write.

`load_adapter` validates the config, the backbone identity, every tensor name,
shape and dtype against the model's own layers before it touches the model, so
a bad file raises one `AdapterError` and leaves the model exactly as it was.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adapters.config import AdapterConfig, BaseModelRef, DCFTConfig, TaskType
from adapters.errors import AdapterFileError, BaseModelMismatchError
from adapters.functional import grid_shape
from adapters.injection import (
    adapter_state,
    backbone_prefix,
    dcft_layers,
    exact_targets,
    inject_adapter,
    set_adapter_tensors,
)
from adapters.layer import DCFTLinear
from adapters.store.files import WEIGHTS_NAME, read_adapter_config, read_adapter_tensors, write_adapter_dir
from adapters.targets import is_adaptable, out_in


def layer_dims(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(out, in) of every adaptable layer by backbone-relative name, wrapped or not."""
    dims = {}
    prefix = backbone_prefix(model)
    for full_name, module in model.named_modules():
        name = full_name.removeprefix(prefix)
        if isinstance(module, DCFTLinear):
            dims[name] = (module.out_features, module.in_features)
        elif is_adaptable(module) and not full_name.endswith(".base"):
            dims[name] = out_in(module)
    return dims


def expected_dcft_shapes(config: AdapterConfig, dims: dict[str, tuple[int, int]]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape that `config` implies on a backbone with these layer dims."""
    shapes: dict[str, tuple[int, ...]] = {}
    s, stride, k = config.kernel_size, config.effective_stride, config.rank
    for name in config.target_layers:
        if name not in dims:
            raise AdapterFileError(f"adapter targets layer '{name}', which this backbone does not have")
        try:
            m, n = grid_shape(*dims[name], s, stride)
        except ValueError as err:
            raise AdapterFileError(f"layer '{name}': {err}") from None
        shapes |= {f"{name}.dcft_A": (k, n), f"{name}.dcft_B": (m, k), f"{name}.dcft_C": (s, s)}
    return shapes


def check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], where: str) -> None:
    """Exactly the expected names, each with the expected shape."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise AdapterFileError(f"{where}: missing tensors {missing[:3]}, unexpected tensors {extra[:3]}")
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != tuple(shape):
            raise AdapterFileError(
                f"{where}: tensor '{name}' has shape {tuple(tensors[name].shape)}, expected {tuple(shape)}"
            )


def check_base_model(config: AdapterConfig, model: nn.Module, where: str) -> None:
    found = BaseModelRef.from_model_config(config.base_model.name, model.config)
    if not found.matches(config.base_model):
        raise BaseModelMismatchError(
            f"{where}: adapter was made for backbone '{config.base_model.name}' "
            f"(config digest {config.base_model.config_digest}), this model's digest is {found.config_digest}"
        )


def _nested(a: str, b: str) -> bool:
    """a and b are the same module or one contains the other."""
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def check_head_modules(config: AdapterConfig, model: nn.Module, where: str) -> None:
    """Heads are distinct, existing modules apart from every target layer, so loading
    one can never overwrite the frozen backbone or another part of the adapter."""
    prefix = backbone_prefix(model)
    targets = [prefix + name for name in config.target_layers]
    for i, head in enumerate(config.head_modules):
        if not head:
            raise AdapterFileError(f"{where}: a head module name is empty (that would be the whole model)")
        clash = next((t for t in targets if _nested(head, t)), None)
        if clash is not None:
            raise AdapterFileError(f"{where}: head module '{head}' overlaps target layer '{clash}'")
        if prefix and _nested(head, prefix.rstrip(".")):
            raise AdapterFileError(f"{where}: head module '{head}' overlaps the frozen backbone")
        if any(_nested(head, other) for other in config.head_modules[:i]):
            raise AdapterFileError(f"{where}: head module '{head}' overlaps another head module")
        try:
            model.get_submodule(head)
        except AttributeError:
            raise AdapterFileError(f"{where}: head module '{head}' does not exist in this model") from None


def read_checked_adapter(adapter_dir: str | Path, model: nn.Module) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Config and tensors of an adapter directory, fully validated against `model`."""
    where = str(Path(adapter_dir) / WEIGHTS_NAME)
    config = read_adapter_config(adapter_dir)
    check_base_model(config, model, where)
    tensors = read_adapter_tensors(adapter_dir)
    expected = expected_dcft_shapes(config, layer_dims(model))
    check_head_modules(config, model, where)
    for head in config.head_modules:
        head_state = model.get_submodule(head).state_dict()
        expected |= {f"{head}.{key}": tuple(value.shape) for key, value in head_state.items()}
    check_tensors(tensors, expected, where)
    return config, tensors


@torch.no_grad()
def load_adapter(model: nn.Module, adapter_dir: str | Path) -> AdapterConfig:
    """Inject the adapter at `adapter_dir` into an unwrapped model and fill its tensors."""
    config, tensors = read_checked_adapter(adapter_dir, model)
    exact = config.dcft.model_copy(update={"targets": exact_targets(model, config.target_layers)})
    inject_adapter(model, exact, config.head_modules)
    layers = {name: tuple(tensors[f"{name}.dcft_{part}"] for part in "ABC") for name in config.target_layers}
    set_adapter_tensors(model, layers)
    for head in config.head_modules:
        state = {key[len(head) + 1 :]: t for key, t in tensors.items() if key.startswith(head + ".")}
        model.get_submodule(head).load_state_dict(state)
    return config


def adapter_config_for(
    model: nn.Module, config: DCFTConfig, base_name: str, task_type: TaskType,
    head_modules: list[str], labels: list[str] = (), metadata: dict | None = None,
) -> AdapterConfig:
    """The file-level config of the adapter injected in `model`."""
    return AdapterConfig(
        **config.model_dump(),
        task_type=task_type,
        base_model=BaseModelRef.from_model_config(base_name, model.config),
        target_layers=list(dcft_layers(model)),
        head_modules=list(head_modules),
        labels=list(labels),
        metadata=metadata or {},
    )


def save_adapter(model: nn.Module, adapter_dir: str | Path, config: AdapterConfig) -> Path:
    """Write the model's adapter (DCFT tensors + head) with `config` as its description."""
    return write_adapter_dir(adapter_dir, config, adapter_state(model, config.head_modules))
