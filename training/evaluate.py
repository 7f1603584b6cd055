"""Evaluate a saved adapter directory on a dataset split, and the baseline it is measured against."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase, Trainer, set_seed

from adapters.config import TaskType
from adapters.injection import default_head_modules
from adapters.store.files import read_adapter_config
from adapters.store.loading import load_adapter
from backbones.loading import load_backbone, load_tokenizer, pick_device
from backbones.shipped import resolve_model_dir
from training.config import OptimConfig, TrainConfig
from training.data import DataConfig, TextExample, load_dataset
from training.features import collator_for, tokenize
from training.metrics import metrics_for, perplexity
from training.train import fit, training_arguments


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


def baseline_metrics(config: TrainConfig) -> dict[str, float]:
    """What a DCFT adapter trained by `config` is measured against, on the same test split:
    the bare backbone for a causal LM, a task head trained alone (same data and optimiser
    settings, frozen backbone) for classification and regression."""
    set_seed(config.optim.seed)
    device = pick_device(config.device)
    model_dir = resolve_model_dir(config.model_source)
    splits = load_dataset(config.data)
    model = load_backbone(model_dir, config.task_type, splits.num_labels, device=device)
    tokenizer = load_tokenizer(model_dir)
    if config.task_type == "causal_lm":
        return evaluate_model(model, tokenizer, splits.test, "causal_lm", config.optim, device)
    model.requires_grad_(False)
    for head in default_head_modules(model, config.task_type):
        model.get_submodule(head).requires_grad_(True)
    with tempfile.TemporaryDirectory() as work:
        result = fit(model, tokenizer, splits, config.task_type, config.optim, Path(work), device, 0.0, ("test",))
    return result.metrics


def versus_baseline(config: TrainConfig, metrics: dict[str, float]) -> str:
    """One line: the trained adapter's test metric next to its baseline's (which this computes)."""
    baseline = baseline_metrics(config)
    if config.task_type == "causal_lm":
        after, before = metrics["test_perplexity"], baseline["test_perplexity"]
        return f"held-out perplexity {after:.1f} with the adapter vs {before:.1f} bare ({after / before - 1:+.1%})"
    key = "test_pearson" if config.task_type == "regression" else "test_accuracy"
    return f"{key.removeprefix('test_')} on test {metrics[key]:.3f} with the adapter vs {baseline[key]:.3f} head only"
