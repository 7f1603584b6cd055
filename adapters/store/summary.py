"""A readable summary of one adapter directory (`dcft inspect`)."""

from __future__ import annotations

from pathlib import Path

from adapters.store.files import CONFIG_NAME, WEIGHTS_NAME, adapter_digest, read_adapter_config, read_adapter_tensors


def describe(adapter_dir: str | Path) -> dict:
    """Config, digest, parameter counts, bytes on disk and per-layer shapes."""
    path = Path(adapter_dir)
    config = read_adapter_config(path)
    tensors = read_adapter_tensors(path)
    layers: dict[str, dict[str, list[int]]] = {}
    head = 0
    for name, tensor in tensors.items():
        layer, _, part = name.rpartition(".")
        if part.startswith("dcft_"):
            layers.setdefault(layer, {})[part.removeprefix("dcft_")] = list(tensor.shape)
        else:
            head += tensor.numel()
    return {
        "path": str(path),
        "digest": adapter_digest(path),
        "config": config.model_dump(mode="json", exclude={"metadata"}),
        "metadata": config.metadata,
        "parameters": {"dcft": sum(t.numel() for n, t in tensors.items() if ".dcft_" in n), "head": head},
        "bytes_on_disk": sum((path / n).stat().st_size for n in (CONFIG_NAME, WEIGHTS_NAME)),
        "dtypes": sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()}),
        "layers": {name: layers[name] for name in config.target_layers if name in layers},
    }
