"""One fine-tuning job's training: a backbone, DCFT on its target layers, transformers' Trainer with
DCFT's regulariser (training/trainer.py), examples from a checked training file. No store, no Ray:
progress, cancellation and checkpoints go through `JobHooks` (training/job_progress.py), and the
runner (training/job_runner.py) does the I/O."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import PrinterCallback, set_seed

from adapters.config import AdapterConfig, DCFTConfig
from adapters.injection import default_head_modules, inject_adapter
from adapters.store.job_data import Example, LabelledText
from adapters.store.loading import adapter_config_for, load_adapter, save_adapter
from backbones.loading import backbone_ref, load_backbone, load_tokenizer, pick_device
from training.config import OptimConfig
from training.data import TextExample
from training.features import Features, collator_for, tokenize
from training.job_progress import JobHooks, JobProgress
from training.metrics import metrics_for
from training.supervised import supervised_collator, tokenize_supervised
from training.train import param_groups, training_arguments
from training.trainer import DCFTTrainer

JobTask = Literal["causal_lm", "seq_cls"]


@dataclass(frozen=True)
class JobSpec:
    model_dir: Path
    task_type: JobTask
    dcft: DCFTConfig
    optim: OptimConfig
    labels: tuple[str, ...] = ()  # a classifier's classes, in index order
    device: str | None = None


@dataclass(frozen=True)
class Resume:
    """Where a lost run left off: the adapter of its last checkpoint, after `epochs` whole epochs."""

    adapter_dir: Path
    epochs: int
    step: int


@dataclass
class JobOutcome:
    state: Literal["done", "cancelled", "diverged"]
    adapter_dir: Path | None = None
    reason: str | None = None
    published: str | None = None  # the adapter's name in the hub, TENANT/SUFFIX@N, once published
    trained_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def features_of(examples: tuple[Example, ...], spec: JobSpec, tokenizer) -> Features:
    if not examples:  # no validation file
        return Features([])
    if spec.task_type == "causal_lm":
        return tokenize_supervised(examples, tokenizer, spec.optim.max_length)  # type: ignore[arg-type]
    rows = [TextExample(e.text, e.text_pair, spec.labels.index(e.label))
            for e in examples if isinstance(e, LabelledText)]
    return tokenize(rows, tokenizer, "seq_cls", spec.optim.max_length)


def build_model(spec: JobSpec, resume: Resume | None, device: torch.device) -> tuple[nn.Module, list[str]]:
    """The backbone with its task head and a fresh adapter, or the adapter of a checkpoint."""
    num_labels = len(spec.labels) if spec.task_type == "seq_cls" else None
    model = load_backbone(spec.model_dir, spec.task_type, num_labels, device=device)
    if spec.labels:
        model.config.id2label = dict(enumerate(spec.labels))
        model.config.label2id = {label: i for i, label in enumerate(spec.labels)}
    heads = default_head_modules(model, spec.task_type)
    if resume is not None:
        load_adapter(model, resume.adapter_dir)
        model.to(device)
    else:
        inject_adapter(model, spec.dcft, heads)
    return model, heads


def adapter_config(spec: JobSpec, model: nn.Module, heads: list[str], metadata: dict) -> AdapterConfig:
    name = backbone_ref(spec.model_dir, model.config).name
    return adapter_config_for(model, spec.dcft, name, spec.task_type, heads, list(spec.labels), metadata)


def train_job(spec: JobSpec, train: tuple[Example, ...], validation: tuple[Example, ...], hooks: JobHooks,
              work_dir: Path, resume: Resume | None = None) -> JobOutcome:
    """Train per `spec`; on success the adapter is saved in `work_dir/adapter`. A resumed run trains the
    epochs its checkpoint had left."""
    set_seed(spec.optim.seed)
    device = pick_device(spec.device)
    tokenizer = load_tokenizer(spec.model_dir)
    model, heads = build_model(spec, resume, device)
    train_features, eval_features = features_of(train, spec, tokenizer), features_of(validation, spec, tokenizer)
    done = resume.epochs if resume else 0
    optim = spec.optim.model_copy(update={"epochs": spec.optim.epochs - done})
    tokens = sum(len(row["input_ids"]) for row in train_features.rows)
    progress = JobProgress(hooks, lambda m, path: save_adapter(m, path, adapter_config(spec, m, heads, {})),
                           optim.batch_size, tokens / max(len(train_features), 1),
                           step_offset=resume.step if resume else 0, epoch_offset=done)
    collator = supervised_collator(tokenizer) if spec.task_type == "causal_lm" else collator_for(tokenizer, "seq_cls")
    evaluate = "epoch" if len(eval_features) else "no"
    arguments = training_arguments(optim, spec.task_type, work_dir / "trainer", device, eval_strategy=evaluate,
                                   save_strategy="no", load_best_model_at_end=False, logging_first_step=True,
                                   logging_nan_inf_filter=False, disable_tqdm=True)
    trainer = DCFTTrainer(model=model, args=arguments, train_dataset=train_features,
                          eval_dataset=eval_features if len(eval_features) else None, data_collator=collator,
                          compute_metrics=metrics_for(spec.task_type),
                          optimizers=(torch.optim.AdamW(param_groups(model, optim), weight_decay=optim.weight_decay),
                                      None),
                          gamma=optim.gamma, callbacks=[progress])
    trainer.remove_callback(PrinterCallback)  # progress goes to the job's events, not to stdout
    trainer.train()
    if progress.cancelled:
        return JobOutcome("cancelled", reason="cancelled by the tenant")
    if progress.diverged:
        return JobOutcome("diverged", reason=progress.diverged)
    metrics = {"train_loss": progress.last_loss} if progress.last_loss is not None else {}
    out = save_adapter(model, work_dir / "adapter", adapter_config(spec, model, heads, {"metrics": metrics}))
    return JobOutcome("done", out, trained_tokens=int(tokens * optim.epochs), metrics=metrics)
