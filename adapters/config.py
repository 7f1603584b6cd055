"""Typed adapter config: the hyper-parameters of a DCFT adapter and what it was made for.

It is saved as `adapter_config.json` next to `adapter_model.safetensors` (the
layout PEFT users know) and validated at every edge that reads one.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, model_validator

FORMAT_VERSION = 1

TaskType = Literal["seq_cls", "regression", "causal_lm"]
InitScheme = Literal["paper", "zero_delta"]

# Config keys that fix a backbone's architecture. Task-specific keys (num_labels,
# id2label) and bookkeeping (transformers_version, dtype) stay out, so one
# backbone has one identity whatever head sits on it.
_ARCHITECTURE_KEYS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "n_embd",
    "num_hidden_layers",
    "n_layer",
    "num_attention_heads",
    "n_head",
    "num_key_value_heads",
    "intermediate_size",
    "n_inner",
    "head_dim",
    "max_position_embeddings",
    "n_positions",
    "type_vocab_size",
    "tie_word_embeddings",
)


class BaseModelRef(BaseModel):
    """Which backbone an adapter belongs to: a name and a digest of its architecture."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=256)
    config_digest: str = Field(pattern=r"^[0-9a-f]{16,64}$")

    @classmethod
    def from_model_config(cls, name: str, config: Any) -> BaseModelRef:
        """Build a ref from a transformers `PretrainedConfig` (or a plain dict)."""
        values = config if isinstance(config, dict) else config.to_dict()
        if "text_config" in values and isinstance(values["text_config"], dict):
            values = values["text_config"]
        picked = {key: values.get(key) for key in _ARCHITECTURE_KEYS}
        blob = json.dumps(picked, sort_keys=True, separators=(",", ":")).encode()
        return cls(name=name, config_digest=hashlib.sha256(blob).hexdigest()[:32])

    def matches(self, other: BaseModelRef) -> bool:
        """Same architecture digest; names may differ (a copy of the same folder)."""
        return self.config_digest == other.config_digest


class DCFTConfig(BaseModel):
    """What shapes a DCFT adapter. The math: docs/architecture.md, "The math contract"."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kernel_size: int = Field(8, ge=1, le=128, description="s: side of the s×s kernel C.")
    stride: int | None = Field(None, ge=1, le=128, description="Transposed-conv stride; defaults to kernel_size.")
    rank: int = Field(1, ge=1, le=64, description="k: rank of F = B @ A (the paper uses 1).")
    alpha: float = Field(1.0, gt=0, le=1e4, description="dW is scaled by alpha / rank.")
    targets: list[str] = Field(
        default_factory=lambda: ["all"],
        min_length=1,
        description="Presets (all, attention, qv, ffn), roles (q, k, v, o, ffn_in, "
        "ffn_out) or regexes full-matched against module names.",
    )
    init: InitScheme = Field(
        "zero_delta",
        description="paper: A, B, C ~ N(0, 0.02); zero_delta: B = 0 so dW = 0 at step 0.",
    )

    @model_validator(mode="after")
    def _stride_fits_kernel(self) -> DCFTConfig:
        if self.stride is not None and self.stride > self.kernel_size:
            raise ValueError(
                f"stride {self.stride} is larger than kernel_size {self.kernel_size}: "
                "the transposed convolution would leave gaps in dW"
            )
        return self

    @property
    def effective_stride(self) -> int:
        return self.kernel_size if self.stride is None else self.stride

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class AdapterConfig(DCFTConfig):
    """Everything `adapter_config.json` holds: DCFT shape, backbone, task and head."""

    format_version: Literal[1] = FORMAT_VERSION
    peft_type: Literal["DCFT"] = "DCFT"
    task_type: TaskType = "seq_cls"
    base_model: BaseModelRef
    target_layers: list[str] = Field(min_length=1, description="Resolved names of the adapted linear layers.")
    head_modules: list[str] = Field(
        default_factory=list, description="Trainable task-head modules saved with the adapter."
    )
    labels: list[str] = Field(default_factory=list, description="Class names in logit order (classification).")
    metadata: dict[str, JsonValue] = Field(default_factory=dict, description="Tokenizer, training arguments, metrics.")

    @property
    def dcft(self) -> DCFTConfig:
        return DCFTConfig(**{name: getattr(self, name) for name in DCFTConfig.model_fields})
