"""Export a DCFT adapter folder as an exact PEFT LoRA adapter folder.

Every DCFT layer is a LoRA of rank k*s (docs/architecture.md, "The math contract"): `dW = scale * up @ down` with
`down = G^T` (k*s, in) and `up = H^T` (out, k*s), from `functional.lora_factors`. The
export writes them as PEFT's `lora_A` / `lora_B` weights with `r = k*s` and
`lora_alpha = scale * r` (PEFT scales by `lora_alpha / r`), and the task head as a
`modules_to_save` module, so a LoRA runtime (PEFT, vLLM, SGLang, LoRAX, TGI) computes
the same function. The price is size: a LoRA of rank k*s stores `k*s*(in + out)`
numbers per layer where DCFT stores `k*(in + out)/s + s*s`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel
from safetensors.torch import save as save_safetensors_bytes
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

from adapters.config import AdapterConfig
from adapters.errors import AdapterConfigError
from adapters.functional import lora_factors
from adapters.injection import backbone_prefix
from adapters.store.atomic import write_atomic
from adapters.store.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from adapters.store.loading import read_checked_adapter

PEFT_TASK_TYPES = {"seq_cls": "SEQ_CLS", "regression": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}
# PEFT prefixes every key of a saved adapter with its wrapper's path to the model.
PEFT_KEY_PREFIX = "base_model.model."


class ExportSummary(BaseModel):
    """What `export_peft_lora` wrote, and the size trade-off it cost."""

    out_dir: str
    rank: int
    lora_alpha: float
    layers: int
    head_modules: list[str]
    dcft_bytes: int
    lora_bytes: int


def recorded_backbone(config: AdapterConfig) -> str:
    """The backbone an adapter was trained on: the model it records, else its base model name."""
    return config.metadata.get("train_config", {}).get("model") or config.base_model.name


def task_model_skeleton(model_dir: str | Path, config: AdapterConfig) -> nn.Module:
    """The adapter's task model (backbone + head) on the meta device: names and shapes, no weights."""
    model_config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    auto_class = AutoModelForCausalLM
    if config.task_type != "causal_lm":
        auto_class = AutoModelForSequenceClassification
        model_config.num_labels = max(1, len(config.labels))
    with torch.device("meta"):
        return auto_class.from_config(model_config)


def lora_state(config: AdapterConfig, tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """PEFT's saved-adapter keys -> tensors: lora_A/lora_B per target layer, then the head's."""
    state = {}
    for layer in config.target_layers:
        A, B, C = (tensors[f"{layer}.dcft_{part}"] for part in ("A", "B", "C"))
        down, up = lora_factors(A, B, C, config.effective_stride)
        state[f"{PEFT_KEY_PREFIX}{prefix}{layer}.lora_A.weight"] = down  # (k*s, in)
        state[f"{PEFT_KEY_PREFIX}{prefix}{layer}.lora_B.weight"] = up  # (out, k*s)
    heads = tuple(head + "." for head in config.head_modules)
    state |= {f"{PEFT_KEY_PREFIX}{name}": t.contiguous() for name, t in tensors.items() if name.startswith(heads)}
    return state


def peft_lora_config(config: AdapterConfig, base_model: str, fan_in_fan_out: bool) -> dict:
    """PEFT's `adapter_config.json` for the exported LoRA (the fields LoRA runtimes read)."""
    rank = config.rank * config.kernel_size
    return {
        "peft_type": "LORA",
        "task_type": PEFT_TASK_TYPES[config.task_type],
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": config.scale * rank,  # PEFT's scaling lora_alpha / r is then DCFT's scale
        "target_modules": list(config.target_layers),
        "modules_to_save": list(config.head_modules) or None,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_dropout": 0.0,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def export_peft_lora(adapter_dir: str | Path, out_dir: str | Path, model_dir: str | Path,
                     base_model: str | None = None) -> ExportSummary:
    """Write the adapter at `adapter_dir` as a PEFT LoRA folder for the backbone in `model_dir`.

    The adapter is checked against that backbone first (digest, layer names, shapes, head);
    `base_model` is what the LoRA config names as its base (default: `model_dir`).
    """
    source, out = Path(adapter_dir), Path(out_dir)
    if out.resolve() == source.resolve():
        raise AdapterConfigError(f"export folder '{out}' is the adapter's own folder: choose another one")
    model = task_model_skeleton(model_dir, read_adapter_config(source))
    config, tensors = read_checked_adapter(source, model)
    prefix = backbone_prefix(model)
    # GPT-2's Conv1D stores its weight as (in, out): PEFT's flag for that layout
    conv1d = any(not isinstance(model.get_submodule(prefix + name), nn.Linear) for name in config.target_layers)
    peft_config = peft_lora_config(config, base_model or str(model_dir), fan_in_fan_out=conv1d)
    state = lora_state(config, tensors, prefix)
    write_atomic(out / WEIGHTS_NAME, save_safetensors_bytes(state, metadata={"format": "pt"}))
    write_atomic(out / CONFIG_NAME, json.dumps(peft_config, indent=2).encode())
    return ExportSummary(
        out_dir=str(out), rank=peft_config["r"], lora_alpha=peft_config["lora_alpha"],
        layers=len(config.target_layers), head_modules=config.head_modules,
        dcft_bytes=folder_bytes(source), lora_bytes=folder_bytes(out),
    )


def folder_bytes(folder: Path) -> int:
    return sum((folder / name).stat().st_size for name in (CONFIG_NAME, WEIGHTS_NAME))
