"""Typed training config, validated at the edge (CLI flags or a JSON file)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from adapters.config import DCFTConfig, TaskType
from training.data import DataConfig


class OptimConfig(BaseModel):
    """The usual training knobs, handed to transformers' TrainingArguments."""

    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(3.0, gt=0)
    max_steps: int = Field(-1, description="Overrides epochs when > 0.")
    learning_rate: float = Field(2e-2, gt=0, description="For the DCFT tensors; see benchmarks/quality/grid.py.")
    head_learning_rate: float | None = Field(None, gt=0, description="Defaults to learning_rate.")
    kernel_lr_multiplier: float = Field(
        1.0, gt=0, description="DCFT's kernel C trains at learning_rate times this (LoRA's B, for LoRA baselines)."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a better validation metric."
    )
    group_by_length: bool = Field(False, description="Batch examples of similar length (less padding, same epochs).")
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.06, ge=0, lt=1)
    batch_size: int = Field(32, ge=1, le=4096)
    eval_batch_size: int = Field(128, ge=1, le=4096)
    max_length: int = Field(64, ge=8, le=8192)
    seed: int = 0
    gamma: float = Field(0.1, ge=0, description="Weight of the orthogonal regulariser (paper eq. 4).")
    eval_every_epoch: bool = True
    logging_steps: int = Field(20, ge=1)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None, description="Backbone folder or shipped alias; default minilm, or smollm2 for causal_lm."
    )
    data: DataConfig = Field(default_factory=DataConfig)
    dcft: DCFTConfig = Field(default_factory=DCFTConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    output_dir: Path = Path("runs/adapter")
    device: str | None = Field(None, description="cuda or cpu; default: cuda when present.")

    @property
    def task_type(self) -> TaskType:
        return self.data.resolved_task_type

    @property
    def model_source(self) -> str:
        return self.model or ("smollm2" if self.task_type == "causal_lm" else "minilm")
