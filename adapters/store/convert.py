"""Convert the DCFT authors' released loralib checkpoints to our adapter format.

Their `SVDLinear` stores, per layer, `lora_A` (1, in/s), `lora_B` (out/s, 1) and
`lora_C` (1, 1, s, s), and adds `x @ conv_transpose2d(A.T @ B.T, C)` (an (in, out)
update). In our (out, in) layout that is kron(B @ A, C.T): our C is their C
transposed. Only safetensors input is read; we never unpickle a checkpoint.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from adapters.config import AdapterConfig, BaseModelRef, TaskType
from adapters.errors import AdapterFileError
from adapters.store.files import write_adapter_dir

SUFFIXES = ("lora_A", "lora_B", "lora_C")


def loralib_to_dcft(state: dict[str, torch.Tensor], layer_names: list[str]) -> dict[str, torch.Tensor]:
    """Map `<their name>.lora_{A,B,C}` to `<our layer>.dcft_{A,B,C}` (C transposed).

    Their names may carry a different prefix (e.g. `roberta.` vs none); each is
    matched to the one layer of ours whose name it ends with.
    """
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        prefix, _, suffix = key.rpartition(".")
        if suffix in SUFFIXES:
            grouped.setdefault(prefix, {})[suffix] = tensor
    if not grouped:
        raise AdapterFileError("no lora_A/lora_B/lora_C tensors found: not a loralib DCFT checkpoint")
    out = {}
    for prefix, parts in grouped.items():
        if set(parts) != set(SUFFIXES):
            raise AdapterFileError(f"layer '{prefix}': has {sorted(parts)}, needs all of {list(SUFFIXES)}")
        ours = _match_layer(prefix, layer_names)
        C = parts["lora_C"]
        if C.dim() != 4 or C.shape[:2] != (1, 1):
            raise AdapterFileError(f"layer '{prefix}': lora_C has shape {tuple(C.shape)}, expected (1, 1, s, s)")
        out |= {f"{ours}.dcft_A": parts["lora_A"], f"{ours}.dcft_B": parts["lora_B"], f"{ours}.dcft_C": C[0, 0].T}
    return {name: t.float().contiguous() for name, t in out.items()}


def _match_layer(prefix: str, layer_names: list[str]) -> str:
    hits = [
        name for name in layer_names if prefix == name or prefix.endswith("." + name) or name.endswith("." + prefix)
    ]
    if len(hits) != 1:
        raise AdapterFileError(f"checkpoint layer '{prefix}' matches {len(hits)} layers of the backbone, expected 1")
    return hits[0]


def convert_loralib_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    base_model: BaseModelRef,
    layer_names: list[str],
    scaling: float = 1.0,
    task_type: TaskType = "seq_cls",
) -> AdapterConfig:
    """Read a loralib safetensors checkpoint and write an adapter directory.

    `scaling` is their `lora_alpha / r`, the factor their forward multiplies the update by.
    """
    tensors = _read_checkpoint(Path(checkpoint), layer_names)
    targets = sorted({name.rsplit(".", 1)[0] for name in tensors}, key=layer_names.index)
    first = targets[0]
    A, C = tensors[f"{first}.dcft_A"], tensors[f"{first}.dcft_C"]
    config = AdapterConfig(
        kernel_size=C.shape[0], rank=A.shape[0], alpha=scaling * A.shape[0],
        targets=[re.escape(name) for name in targets],
        base_model=base_model, target_layers=targets, task_type=task_type,
        metadata={"converted_from": "loralib SVDLinear"},
    )
    write_adapter_dir(out_dir, config, tensors)
    return config


def _read_checkpoint(path: Path, layer_names: list[str]) -> dict[str, torch.Tensor]:
    """Our tensors from a loralib safetensors checkpoint; anything else is one AdapterFileError."""
    if path.suffix != ".safetensors":
        raise AdapterFileError(
            f"{path}: only .safetensors is read (no pickle). Convert a .bin once, in a trusted "
            "environment: safetensors.torch.save_file(torch.load(p, weights_only=True), 'ckpt.safetensors')"
        )
    try:
        return loralib_to_dcft(load_file(path), layer_names)
    except AdapterFileError:
        raise
    except Exception as err:
        raise AdapterFileError(f"{path}: unreadable safetensors file: {err}") from None
