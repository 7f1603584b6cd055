"""What a fine-tuning job reports while it trains, as a transformers callback: metrics events at
least every `events_every_steps` steps, a checkpoint at each epoch's end, a stop within one step of a
cancel, and a stop as soon as the training loss is no longer a finite number."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from transformers import TrainerCallback


class JobHooks(Protocol):
    """Where a job's progress goes (the runner writes it to the job's store)."""

    def event(self, message: str, data: dict | None = None, level: str = "info") -> None: ...

    def should_stop(self) -> bool:
        """Whether the job was cancelled (called after every step: keep it cheap)."""

    def checkpoint(self, step: int, epoch: int, adapter_dir: Path, metrics: dict[str, float]) -> None: ...


class JobProgress(TrainerCallback):
    def __init__(self, hooks: JobHooks, save: Callable[[nn.Module, Path], None], batch_size: int,
                 tokens_per_example: float, step_offset: int = 0, epoch_offset: int = 0):
        self.hooks, self.save = hooks, save
        self.batch_size, self.tokens_per_example = batch_size, tokens_per_example
        self.step_offset, self.epoch_offset = step_offset, epoch_offset
        self.cancelled = False
        self.diverged: str | None = None
        self.last_loss: float | None = None
        self._mark = (0, time.perf_counter())  # (step, time) of the last metrics event

    @property
    def stopped(self) -> bool:
        return self.cancelled or self.diverged is not None

    def on_train_begin(self, args, state, control, **kwargs):
        self._mark = (state.global_step, time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_log = True  # the curve ends at the last step
        if self.hooks.should_stop():
            self.cancelled = control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        step = state.global_step + self.step_offset
        if "loss" in logs:
            self._train_loss(float(logs["loss"]), step, state.max_steps + self.step_offset, control)
        validation = {key.removeprefix("eval_"): float(value) for key, value in logs.items()
                      if key in ("eval_loss", "eval_accuracy")}
        if validation:
            data = {"step": step, **{f"valid_{key}": value for key, value in validation.items()}}
            shown = ", ".join(f"{key}={value:.4f}" for key, value in data.items() if key != "step")
            self.hooks.event(f"Step {step}: validation {shown}", data)

    def _train_loss(self, loss: float, step: int, total: int, control) -> None:
        if not math.isfinite(loss):
            self.diverged = f"training diverged: the training loss was {loss} at step {step}"
            control.should_training_stop = True
            return
        self.last_loss = loss
        before, then = self._mark
        seconds = max(time.perf_counter() - then, 1e-9)
        examples = (step - self.step_offset - before) * self.batch_size / seconds
        self._mark = (step - self.step_offset, time.perf_counter())
        data = {"step": step, "total_steps": total, "train_loss": loss, "examples_per_second": round(examples, 2),
                "tokens_per_second": round(examples * self.tokens_per_example, 1)}
        self.hooks.event(f"Step {step}/{total}: training loss={loss:.4f}", data)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if self.stopped or model is None:  # a stopped epoch did not end: nothing to keep
            return
        epoch = round(state.epoch or 0) + self.epoch_offset
        step = state.global_step + self.step_offset
        if not all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad):
            # the loss of the steps since the last event may be unseen: a broken adapter is never kept
            self.diverged = f"training diverged: the adapter's weights were no longer finite at step {step}"
            control.should_training_stop = True
            return
        with tempfile.TemporaryDirectory(prefix="dcft-checkpoint-") as tmp:
            self.save(model, Path(tmp))
            metrics = {"train_loss": self.last_loss} if self.last_loss is not None else {}
            self.hooks.checkpoint(step, epoch, Path(tmp), metrics)
