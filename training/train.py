"""Train a DCFT adapter (and its task head) with transformers' Trainer, then save it."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import EarlyStoppingCallback, PreTrainedTokenizerBase, TrainerCallback, TrainingArguments, set_seed

from adapters.config import AdapterConfig, TaskType
from adapters.injection import default_head_modules, inject_adapter, trainable_parameters
from adapters.store.atomic import write_atomic
from adapters.store.loading import adapter_config_for, save_adapter
from backbones.loading import backbone_ref, load_backbone, load_tokenizer, pick_device
from backbones.shipped import resolve_model_dir
from training.config import OptimConfig, TrainConfig
from training.data import DatasetSplits, load_dataset
from training.features import collator_for, tokenize
from training.metrics import BEST_METRIC, metrics_for, perplexity
from training.trainer import DCFTTrainer


@dataclass(frozen=True)
class ParamRoles:
    """A method's trainable tensors told apart by name: the adapter's train at learning_rate, the
    `multiplied` part of them at learning_rate * kernel_lr_multiplier; anything else trainable is the
    head. Another method (a baseline of the quality benchmark) brings its own names."""

    adapter: tuple[str, ...] = ("dcft_",)
    multiplied: tuple[str, ...] = (".dcft_C",)  # DCFT's kernel C


DCFT_PARAMS = ParamRoles()


@dataclass
class FitResult:
    metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    history: list[dict] = field(default_factory=list)  # Trainer's log history (loss curve, evals)
    resumed_at_epoch: float | None = None  # where a resumed run picked up


def param_groups(model: nn.Module, optim: OptimConfig, roles: ParamRoles = DCFT_PARAMS) -> list[dict]:
    """Adapter tensors at learning_rate (the multiplied part times kernel_lr_multiplier); everything
    else trainable (the head) at head_learning_rate."""
    adapter, multiplied, rest = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if any(m in name for m in roles.multiplied):
            multiplied.append(param)
        else:
            (adapter if any(m in name for m in roles.adapter) else rest).append(param)
    head_lr = optim.head_learning_rate or optim.learning_rate
    groups = [{"params": adapter, "lr": optim.learning_rate}, {"params": rest, "lr": head_lr},
              {"params": multiplied, "lr": optim.learning_rate * optim.kernel_lr_multiplier}]
    return [group for group in groups if group["params"]]


def training_arguments(
    optim: OptimConfig, task_type: TaskType, work_dir: Path, device: torch.device, resumable: bool = False,
    **overrides,
) -> TrainingArguments:
    """`overrides` replace any of the arguments below (a fine-tuning job saves and stops on its own)."""
    by_epoch = optim.eval_every_epoch and optim.max_steps <= 0
    metric, greater = BEST_METRIC[task_type]
    arguments = dict(
        output_dir=str(work_dir),
        num_train_epochs=optim.epochs,
        max_steps=optim.max_steps,
        learning_rate=optim.learning_rate,
        weight_decay=optim.weight_decay,
        warmup_steps=optim.warmup_ratio,  # a float in [0, 1) is a ratio of total steps
        per_device_train_batch_size=optim.batch_size,
        train_sampling_strategy="group_by_length" if optim.group_by_length else "random",
        per_device_eval_batch_size=optim.eval_batch_size,
        eval_strategy="epoch" if by_epoch else "no",
        save_strategy="epoch" if by_epoch else "no",
        load_best_model_at_end=by_epoch,
        metric_for_best_model=metric,
        greater_is_better=greater,
        save_total_limit=1,
        save_only_model=not resumable,  # a resumable run also saves its optimizer, schedule and RNG states
        logging_steps=optim.logging_steps,
        seed=optim.seed,
        report_to=[],
        use_cpu=device.type == "cpu",
        prediction_loss_only=task_type == "causal_lm",
        dataloader_num_workers=0,
    )
    return TrainingArguments(**(arguments | overrides))


def early_stopping(optim: OptimConfig) -> list[EarlyStoppingCallback]:
    by_epoch = optim.eval_every_epoch and optim.max_steps <= 0
    if optim.early_stopping_patience is None or not by_epoch:
        return []
    return [EarlyStoppingCallback(early_stopping_patience=optim.early_stopping_patience)]


class Progress(TrainerCallback):
    """Writes the training time and epochs so far into every checkpoint once it is complete: a resumed run
    then reports its whole time, and the file marks a checkpoint that can be resumed from."""

    FILE = "progress.json"

    def __init__(self, before: dict | None):
        self.before = (before or {}).get("seconds", 0.0)
        self.start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.start

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        write_atomic(checkpoint / self.FILE, json.dumps({"seconds": self.elapsed(), "epoch": state.epoch}).encode())


def last_checkpoint(checkpoints: Path) -> tuple[Path | None, dict | None]:
    """The newest complete checkpoint in `checkpoints` and its progress (None, None when there is none)."""
    complete = [c for c in checkpoints.glob("checkpoint-*") if (c / Progress.FILE).exists()]
    if not complete:
        return None, None
    last = max(complete, key=lambda c: int(c.name.removeprefix("checkpoint-")))
    return last, json.loads((last / Progress.FILE).read_text())


def fit(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    splits: DatasetSplits,
    task_type: TaskType,
    optim: OptimConfig,
    work_dir: Path,
    device: torch.device,
    gamma: float = 0.0,
    report_splits: tuple[str, ...] = ("validation", "test"),
    resumable: bool = False,
    roles: ParamRoles = DCFT_PARAMS,
) -> FitResult:
    """Train whatever is trainable in `model`; return the metrics of `report_splits`.

    With per-epoch evaluation the best epoch on validation is kept (and training stops early
    after `optim.early_stopping_patience` epochs without improvement). A tuning run reports
    validation only, so the test split is read once, by the final run. A `resumable` run that was
    stopped part way continues from the last epoch it finished in `work_dir` (the rest is lost).
    """
    features = {name: tokenize(getattr(splits, name), tokenizer, task_type, optim.max_length)
                for name in ("train", "validation", *report_splits)}
    checkpoints = work_dir / "checkpoints"
    resume_from, progress = last_checkpoint(checkpoints) if resumable else (None, None)
    clock = Progress(progress)
    trainer = DCFTTrainer(
        model=model,
        args=training_arguments(optim, task_type, checkpoints, device, resumable),
        train_dataset=features["train"],
        eval_dataset=features["validation"],
        data_collator=collator_for(tokenizer, task_type),
        compute_metrics=metrics_for(task_type),
        optimizers=(torch.optim.AdamW(param_groups(model, optim, roles), weight_decay=optim.weight_decay), None),
        gamma=gamma,
        callbacks=[clock, *early_stopping(optim)],
    )
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = clock.elapsed()
    metrics = {}
    for split in report_splits:
        if len(features[split]):
            metrics |= trainer.evaluate(features[split], metric_key_prefix=split)
    for split in report_splits:
        if task_type == "causal_lm" and f"{split}_loss" in metrics:
            metrics[f"{split}_perplexity"] = perplexity(metrics[f"{split}_loss"])
    shutil.rmtree(checkpoints, ignore_errors=True)
    return FitResult(
        metrics={k: float(v) for k, v in metrics.items() if isinstance(v, int | float)},
        train_seconds=seconds,
        history=trainer.state.log_history,
        resumed_at_epoch=progress and progress["epoch"],
    )


def train_adapter(config: TrainConfig) -> tuple[AdapterConfig, FitResult]:
    """Train a DCFT adapter per `config` and write it to `config.output_dir`."""
    set_seed(config.optim.seed)
    device = pick_device(config.device)
    model_dir = resolve_model_dir(config.model_source)
    splits = load_dataset(config.data)
    model = load_backbone(model_dir, config.task_type, splits.num_labels, device=device)
    if splits.labels:
        model.config.id2label = dict(enumerate(splits.labels))
        model.config.label2id = {label: i for i, label in enumerate(splits.labels)}
    tokenizer = load_tokenizer(model_dir)
    heads = default_head_modules(model, config.task_type)
    inject_adapter(model, config.dcft, heads)
    counts = trainable_parameters(model)
    result = fit(
        model, tokenizer, splits, config.task_type, config.optim, config.output_dir, device, config.optim.gamma
    )
    metadata = {
        "tokenizer": backbone_ref(model_dir, model.config).name,
        "dataset": splits.name,
        "train_config": config.model_dump(mode="json"),
        "metrics": result.metrics,
        "train_seconds": round(result.train_seconds, 2),
        "trainable_parameters": counts,
    }
    adapter = adapter_config_for(model, config.dcft, backbone_ref(model_dir, model.config).name,
                                 config.task_type, heads, splits.labels, metadata)
    save_adapter(model, config.output_dir, adapter)
    return adapter, result
