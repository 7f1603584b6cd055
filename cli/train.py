"""`dcft train` and `dcft eval`: flags (or a JSON config file) -> TrainConfig -> one call."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from cli.output import print_json

# flag -> (section, field) of TrainConfig; None section = top level
TRAIN_FLAGS: dict[str, tuple[str | None, str]] = {
    "model": (None, "model"),
    "out": (None, "output_dir"),
    "device": (None, "device"),
    "data": ("data", "source"),
    "task": ("data", "task_type"),
    "text_columns": ("data", "text_columns"),
    "label_column": ("data", "label_column"),
    "labels": ("data", "labels"),
    "validation_data": ("data", "validation_source"),
    "test_data": ("data", "test_source"),
    "max_examples": ("data", "max_examples"),
    "kernel_size": ("dcft", "kernel_size"),
    "stride": ("dcft", "stride"),
    "rank": ("dcft", "rank"),
    "alpha": ("dcft", "alpha"),
    "targets": ("dcft", "targets"),
    "init": ("dcft", "init"),
    "epochs": ("optim", "epochs"),
    "max_steps": ("optim", "max_steps"),
    "lr": ("optim", "learning_rate"),
    "head_lr": ("optim", "head_learning_rate"),
    "batch_size": ("optim", "batch_size"),
    "max_length": ("optim", "max_length"),
    "gamma": ("optim", "gamma"),
    "seed": ("optim", "seed"),
}


def train_config_from(args: argparse.Namespace):
    from training.config import TrainConfig

    raw = json.loads(Path(args.config).read_text()) if args.config else {}
    for flag, (section, name) in TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            (raw.setdefault(section, {}) if section else raw)[name] = value
    return TrainConfig.model_validate(raw)


def _train(args: argparse.Namespace) -> None:
    from training.train import train_adapter

    config = train_config_from(args)
    adapter, result = train_adapter(config)
    print(f"adapter written to {config.output_dir}")
    print_json({"metrics": result.metrics, "train_seconds": round(result.train_seconds, 1),
                "trainable_parameters": adapter.metadata.get("trainable_parameters")})


def _eval(args: argparse.Namespace) -> None:
    from training.data import DataConfig
    from training.evaluate import evaluate_adapter

    fields = {"source": args.data, "task_type": args.task, "text_columns": args.text_columns,
              "label_column": args.label_column, "max_examples": args.max_examples}
    data = DataConfig.model_validate({k: v for k, v in fields.items() if v is not None})
    print_json(evaluate_adapter(args.adapter_dir, data, args.split, args.model, args.device))


def _add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="built-in name (rotten-tomatoes, rotten-tomatoes-text) or a .csv/.jsonl path")
    p.add_argument("--task", choices=["seq_cls", "regression", "causal_lm"])
    p.add_argument("--text-columns", nargs="+", help="1 column, or 2 for text pairs")
    p.add_argument("--label-column")
    p.add_argument("--max-examples", type=int, help="cap per split (seeded sample), for quick runs")
    p.add_argument("--model", help="backbone folder or alias (minilm, smollm2)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when present)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a DCFT adapter (and task head) with transformers' Trainer")
    p.add_argument("--config", help="JSON file holding a TrainConfig; flags override it")
    _add_data_flags(p)
    p.add_argument("--labels", nargs="+", help="class names in index order")
    p.add_argument("--validation-data")
    p.add_argument("--test-data")
    p.add_argument("--kernel-size", type=int)
    p.add_argument("--stride", type=int)
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float)
    p.add_argument("--targets", nargs="+", help="presets (all, attention, qv, ffn), roles or regexes")
    p.add_argument("--init", choices=["paper", "zero_delta"])
    p.add_argument("--gamma", type=float, help="orthogonal regulariser weight")
    p.add_argument("--epochs", type=float)
    p.add_argument("--max-steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--head-lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--max-length", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--out", help="adapter output directory")
    p.set_defaults(handler=_train)

    p = sub.add_parser("eval", help="evaluate an adapter directory on a dataset split")
    p.add_argument("adapter_dir")
    _add_data_flags(p)
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.set_defaults(handler=_eval)
