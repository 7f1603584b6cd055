"""Evaluate a saved adapter directory on a dataset split."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer

from adapters.config import TaskType
from adapters.store.files import read_adapter_config
from adapters.store.loading import load_adapter
from backbones.loading import load_backbone, load_tokenizer, pick_device
from backbones.shipped import resolve_model_dir
from training.config import OptimConfig
from training.data import DataConfig, TextExample, load_dataset
from training.features import collator_for, tokenize
from training.metrics import metrics_for, perplexity
from training.train import training_arguments


def evaluate_adapter(
    adapter_dir: str | Path,
    data: DataConfig,
    split: str = "test",
    model: str | None = None,
    device: str | None = None,
    optim: OptimConfig | None = None,
) -> dict[str, float]:
    """Metrics of the adapter on one split: accuracy/F1/MCC, Pearson/Spearman, or perplexity.

    `model` defaults to the adapter's recorded backbone (a shipped alias, or the
    folder it was trained from).
    """
    config = read_adapter_config(adapter_dir)
    optim = optim or OptimConfig()
    source = model or config.metadata.get("train_config", {}).get("model") or config.base_model.name
    model_dir = resolve_model_dir(source)
    if config.labels and data.labels is None:
        data = data.model_copy(update={"labels": config.labels})
    splits = load_dataset(data)
    num_labels = None if config.task_type == "causal_lm" else max(1, len(config.labels))
    torch_device = pick_device(device)
    backbone = load_backbone(model_dir, config.task_type, num_labels, device=torch_device)
    load_adapter(backbone, adapter_dir)
    examples = getattr(splits, split)
    return evaluate_model(backbone, load_tokenizer(model_dir), examples, config.task_type, optim, torch_device, split)


def evaluate_model(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[TextExample],
    task_type: TaskType,
    optim: OptimConfig,
    device: torch.device,
    prefix: str = "test",
) -> dict[str, float]:
    """Trainer.evaluate over `examples`; causal LMs also get perplexity."""
    features = tokenize(examples, tokenizer, task_type, optim.max_length)
    with tempfile.TemporaryDirectory() as work:
        trainer = Trainer(
            model=model,
            args=training_arguments(optim, task_type, Path(work), device),
            eval_dataset=features,
            data_collator=collator_for(tokenizer, task_type),
            compute_metrics=metrics_for(task_type),
        )
        metrics = trainer.evaluate(features, metric_key_prefix=prefix)
    if task_type == "causal_lm":
        metrics[f"{prefix}_perplexity"] = perplexity(metrics[f"{prefix}_loss"])
    return {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
