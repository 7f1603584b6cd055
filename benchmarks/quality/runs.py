"""One run of the protocol: train one method with one setting, and score it (MiniLM classifier or causal LM)."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch
from transformers import set_seed

from adapters.config import DCFTConfig
from adapters.injection import default_head_modules, inject_adapter
from backbones.loading import load_backbone, load_tokenizer, pick_device
from backbones.shipped import MINILM, resolve_model_dir
from benchmarks.quality.grid import LM_TARGETS, LORA_TARGETS, Method, Settings
from benchmarks.report import environment
from training.config import OptimConfig
from training.data import ROTTEN_TOMATOES_TEXT, DataConfig, DatasetSplits, load_dataset
from training.evaluate import evaluate_model
from training.train import DCFT_PARAMS, ParamRoles, fit

# PEFT's LoRA and LoKr tensors by name; LoRA's B trains at the multiplied rate, as in LoRA+.
PEFT_PARAMS = ParamRoles(adapter=("lora_", "lokr_"), multiplied=(".lora_B.",))


def prepare(method: Method, settings: Settings, model: torch.nn.Module,
            targets: list[str] | None = None) -> tuple[torch.nn.Module, ParamRoles]:
    """The model to train, with only what `method` trains trainable (the head too, when the model has
    one), and how its trainable tensors are named (PEFT's baselines train through PEFT's wrapper)."""
    heads = default_head_modules(model, "seq_cls") if targets is None else []
    if method.family == "full":
        return model, DCFT_PARAMS
    if method.family == "head":
        model.requires_grad_(False)
        model.get_submodule(heads[0]).requires_grad_(True)
        return model, DCFT_PARAMS
    if method.family == "dcft":
        dcft = DCFTConfig(kernel_size=method.kernel, stride=method.stride, alpha=settings.scale, init=settings.init)
        inject_adapter(model, dcft, heads)
        return model, DCFT_PARAMS
    wrapped = peft_wrapper(method, settings, model, targets or list(method.targets or LORA_TARGETS), heads)
    return wrapped, PEFT_PARAMS


def peft_wrapper(method: Method, settings: Settings, model: torch.nn.Module, targets: list[str],
                 heads: list[str]) -> torch.nn.Module:
    """PEFT LoRA or LoKr injected into `model` in place; the wrapper is what trains."""
    from peft import LoKrConfig, LoraConfig, get_peft_model

    alpha = settings.scale * method.rank
    if method.family == "lora":
        init = True if settings.init in ("default", "kaiming") else settings.init
        config = LoraConfig(r=method.rank, lora_alpha=alpha, lora_dropout=settings.dropout, init_lora_weights=init,
                            target_modules=targets, modules_to_save=heads or None)
    else:
        init = True if settings.init == "default" else settings.init
        config = LoKrConfig(r=method.rank, alpha=alpha, rank_dropout=settings.dropout, init_weights=init,
                            target_modules=targets, modules_to_save=heads or None)
    return get_peft_model(model, config)


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(adapter parameters, head parameters) that train; the head is `classifier` when there is one."""
    trainable = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    head = sum(size for name, size in trainable if ".classifier." in f".{name}")
    return sum(size for _, size in trainable) - head, head


def machine() -> str:
    """The machine a run used, with the 1-minute load average at its end (the CPU may be shared)."""
    env = environment()
    where = env["cuda"] or f"{env['cpu_count']} CPU cores ({env['processor']})"
    return f"{where}, torch threads {env['torch_threads']}, torch {env['torch']}, load {os.getloadavg()[0]:.1f}"


def validation_curve(history: list[dict]) -> list[float]:
    """Validation accuracy (%) after each epoch, from the Trainer's log: is the best epoch the last one?"""
    return [round(100 * entry["eval_accuracy"], 2) for entry in history if "eval_accuracy" in entry]


def run_classifier(task: str, method: Method, settings: Settings, seed: int, final: bool, optim: OptimConfig,
                   splits: DatasetSplits, work: Path) -> dict:
    """Train one method with one setting on one task; a final run also reads the test split once. A run
    stopped part way continues from its last finished epoch in `work`."""
    set_seed(seed)
    device = pick_device()
    model_dir = resolve_model_dir(MINILM)
    model = load_backbone(model_dir, "seq_cls", len(splits.labels), device=device)
    model, roles = prepare(method, settings, model)
    params, head = count_parameters(model)
    tuned = optim.model_copy(update={"learning_rate": settings.lr, "seed": seed, "gamma": settings.gamma,
                                     "kernel_lr_multiplier": settings.part_lr_multiplier})
    report = ("validation", "test") if final else ("validation",)
    result = fit(model, load_tokenizer(model_dir), splits, "seq_cls", tuned, work, device, settings.gamma, report,
                 resumable=True, roles=roles)
    epochs = max((entry.get("epoch", 0) for entry in result.history), default=0)
    row = {"validation_accuracy": result.metrics["validation_accuracy"], "params": params,
           "params_with_head": params + head, "train_seconds": round(result.train_seconds, 1),
           "epochs_run": round(epochs, 2), "validation_by_epoch": validation_curve(result.history),
           "machine": machine()}
    if result.resumed_at_epoch is not None:  # its train_seconds add up both parts
        row["resumed_at_epoch"] = result.resumed_at_epoch
    if final:
        row |= {"test_accuracy": result.metrics["test_accuracy"], "test_f1": result.metrics["test_f1"]}
    return row


def lm_splits(args: argparse.Namespace) -> DatasetSplits:
    splits = load_dataset(DataConfig(source=ROTTEN_TOMATOES_TEXT))
    n_train, n_val, n_test = (8, 4, 4) if args.smoke else (args.lm_train_examples, 100, 300)
    return dataclasses.replace(splits, train=splits.train[:n_train], validation=splits.validation[:n_val],
                               test=splits.test[:n_test])


def run_lm(method: Method | None, settings: Settings | None, final: bool, args: argparse.Namespace,
           work: Path) -> dict:
    """SmolLM2 (or the --lm-model folder) on held-out reviews: bare when `method` is None."""
    set_seed(0)
    device = pick_device()
    model_dir = resolve_model_dir(args.lm_model)
    splits, tokenizer = lm_splits(args), load_tokenizer(model_dir)
    model = load_backbone(model_dir, "causal_lm", device=device)
    optim = OptimConfig(epochs=1, batch_size=8, max_length=48, eval_batch_size=16, logging_steps=50, gamma=0.0)
    if method is None:
        metrics = {}
        for split in ("validation", "test"):
            metrics |= evaluate_model(model, tokenizer, getattr(splits, split), "causal_lm", optim, device, split)
        return {"validation_perplexity": metrics["validation_perplexity"], "test_perplexity":
                metrics["test_perplexity"], "params": 0, "train_seconds": 0.0, "machine": machine()}
    model, roles = prepare(method, settings, model, targets=LM_TARGETS)
    params, _ = count_parameters(model)
    report = ("validation", "test") if final else ("validation",)
    tuned = optim.model_copy(update={"learning_rate": settings.lr})
    result = fit(model, tokenizer, splits, "causal_lm", tuned, work, device, 0.0, report, roles=roles)
    return {**{f"{s}_perplexity": result.metrics[f"{s}_perplexity"] for s in report}, "params": params,
            "train_seconds": round(result.train_seconds, 1), "train_examples": len(splits.train),
            "machine": machine()}
