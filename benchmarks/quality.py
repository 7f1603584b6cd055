"""Quality report: DCFT vs head-only, full fine-tuning and PEFT LoRA on rotten-tomatoes
with the real MiniLM, over several seeds; plus SmolLM2 perplexity before/after a
DCFT adapter trained on review text.

    python -m benchmarks.quality            # the committed report (about an hour on 2 CPU cores)
    python -m benchmarks.quality --smoke    # seconds; what the test suite runs

CPU budget (the defaults): a seeded sample of 1,600 training reviews, 2 epochs,
sequence length 48, validation on 400 reviews (best epoch kept by Trainer), test
on the full 1,275-review test split. Every method uses the same data, seed, batch
size and epochs; only what trains and its learning rate differ.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch
from transformers import set_seed

from adapters.backbones import MINILM, SMOLLM2, load_backbone, load_tokenizer, pick_device, resolve_model_dir
from adapters.config import DCFTConfig
from adapters.injection import default_head_modules, inject_adapter, trainable_parameters
from benchmarks.report import RESULTS_DIR, write_report
from training.config import OptimConfig
from training.data import DataConfig, DatasetSplits, load_dataset
from training.evaluate import evaluate_model
from training.train import fit

LORA_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    kind: str  # head | full | lora | dcft
    lr: float
    rank: int = 1
    kernel: int = 8
    stride: int | None = None
    init: str = "zero_delta"


METHODS = [
    Method("head only", "head", 1e-2),
    Method("full fine-tuning", "full", 1e-4),
    Method("LoRA r1", "lora", 1e-2, rank=1),
    Method("LoRA r8", "lora", 5e-3, rank=8),
    *[Method(f"DCFT k{k}", "dcft", 2e-2, kernel=k) for k in (2, 4, 8, 12)],
    Method("DCFT k8 s4", "dcft", 2e-2, kernel=8, stride=4),
    Method("DCFT k8 s2", "dcft", 2e-2, kernel=8, stride=2),
    Method("DCFT k8 paper-init", "dcft", 2e-2, kernel=8, init="paper"),
]
FINDINGS = (
    "Why we think DCFT k8 falls short here: per layer it learns a rank-1 F = B·A on an 8x coarser grid "
    "plus one 8x8 kernel shared by every block (~160 parameters for a 384x384 layer, vs 768 for LoRA r1), "
    "and this CPU budget gives it only 100 optimizer steps; LoRA r1's std over seeds is itself 1.9 points. "
    "Giving the same kernel more grid (stride 4: 76.2, 12,600 parameters) halves the gap. Not tried for "
    "lack of time: longer training, a separate learning rate for C, alpha > 1."
)
# Learning rates: each adapter family at the best of a one-seed sweep on this budget
# (LoRA r1: 2e-3 76.4, 5e-3 78.4, 1e-2 78.9; DCFT k8: 5e-3 72.1, 2e-2 76.6, 5e-2 75.3).


def subsample(splits: DatasetSplits, train: int, validation: int, seed: int = 0) -> DatasetSplits:
    pick = lambda items, n: tuple(random.Random(seed).sample(items, min(n, len(items))))  # noqa: E731
    return dataclasses.replace(splits, train=pick(splits.train, train), validation=pick(splits.validation, validation))


def prepare(method: Method, model: torch.nn.Module) -> int:
    """Make only what `method` trains trainable; return adapter parameters (head excluded)."""
    heads = default_head_modules(model, "seq_cls")
    if method.kind == "full":
        return sum(p.numel() for n, p in model.named_parameters() if not n.startswith(tuple(heads)))
    if method.kind == "head":
        model.requires_grad_(False)
        model.get_submodule(heads[0]).requires_grad_(True)
        return 0
    if method.kind == "dcft":
        inject_adapter(model, DCFTConfig(kernel_size=method.kernel, stride=method.stride, init=method.init), heads)
        return trainable_parameters(model)["dcft"]
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=method.rank, lora_alpha=method.rank, target_modules=LORA_TARGETS, modules_to_save=heads)
    peft_model = get_peft_model(model, config)
    model.__dict__["_peft"] = peft_model  # keep the wrapper alive; it edits `model` in place
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def run_one(method: Method, splits: DatasetSplits, seed: int, optim: OptimConfig, work: Path) -> dict:
    set_seed(seed)
    device = pick_device()
    model_dir = resolve_model_dir(MINILM)
    model = load_backbone(model_dir, "seq_cls", len(splits.labels), device=device)
    adapter_params = prepare(method, model)
    head_params = sum(p.numel() for p in model.get_submodule("classifier").parameters())
    tuned = optim.model_copy(update={"learning_rate": method.lr, "seed": seed})
    gamma = tuned.gamma if method.kind == "dcft" else 0.0
    result = fit(model, load_tokenizer(model_dir), splits, "seq_cls", tuned, work, device, gamma)
    return {"method": method.name, "seed": seed, "accuracy": result.metrics["test_accuracy"],
            "f1": result.metrics["test_f1"], "mcc": result.metrics["test_mcc"],
            "params": adapter_params, "params_with_head": adapter_params + head_params,
            "train_seconds": result.train_seconds}  # fmt: skip


def mean_or_none(values: list[float]) -> float | None:
    return statistics.mean(values) if values else None


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == name]
        acc = [100 * r["accuracy"] for r in mine]
        rows.append({
            "method": name, "accuracy_mean": statistics.mean(acc),
            "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            # Runs recovered from an interrupted report kept only accuracy: no F1 unless every seed has it.
            "f1_mean": mean_or_none([100 * r["f1"] for r in mine]) if all("f1" in r for r in mine) else None,
            "params": mine[0]["params"],
            "params_with_head": mine[0]["params_with_head"],
            "train_seconds": statistics.mean(r["train_seconds"] for r in mine), "seeds": len(mine),
        })  # fmt: skip
    return rows


def causal_lm_row(train_examples: int, test_examples: int, optim: OptimConfig, work: Path) -> dict:
    """SmolLM2 perplexity on held-out reviews, bare vs with a DCFT adapter trained on reviews."""
    set_seed(0)
    device = pick_device()
    model_dir = resolve_model_dir(SMOLLM2)
    splits = load_dataset(DataConfig(source="rotten-tomatoes-text"))
    splits = dataclasses.replace(subsample(splits, train_examples, 64), test=splits.test[:test_examples])
    model = load_backbone(model_dir, "causal_lm", device=device)
    tokenizer = load_tokenizer(model_dir)
    bare = evaluate_model(model, tokenizer, splits.test, "causal_lm", optim, device)
    inject_adapter(model, DCFTConfig(kernel_size=8))
    tuned_optim = optim.model_copy(update={"learning_rate": 2e-3, "batch_size": 8})
    tuned = fit(model, tokenizer, splits, "causal_lm", tuned_optim, work, device, optim.gamma)
    return {
        "backbone": "SmolLM2-135M",
        "train_examples": len(splits.train),
        "test_examples": len(splits.test),
        "perplexity_before": bare["test_perplexity"],
        "perplexity_after": tuned.metrics["test_perplexity"],
        "dcft_params": trainable_parameters(model)["dcft"],
        "train_seconds": tuned.train_seconds,
    }


def target_summary(rows: list[dict]) -> str:
    """The issue's target, read off the rows: DCFT k8 within 1 point of LoRA r1 with >= 5x fewer parameters."""
    by_name = {row["method"]: row for row in rows}
    dcft, lora, head = (by_name.get(name) for name in ("DCFT k8", "LoRA r1", "head only"))
    if not (dcft and lora and head):
        return ""
    gap = dcft["accuracy_mean"] - lora["accuracy_mean"]
    fewer = lora["params"] / dcft["params"]
    verdict = "meets" if gap >= -1 and fewer >= 5 else "misses"
    return (f"Target (DCFT k8 within 1 point of LoRA r1, >= 5x fewer adapter parameters, far above head-only): "
            f"{verdict} it. DCFT k8 {dcft['accuracy_mean']:.1f} vs LoRA r1 {lora['accuracy_mean']:.1f} "
            f"({gap:+.1f} points) with {fewer:.1f}x fewer parameters; head only {head['accuracy_mean']:.1f} "
            f"({dcft['accuracy_mean'] - head['accuracy_mean']:+.1f} for DCFT k8).")  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        x = max(row["params"], 1)
        ax.errorbar(x, row["accuracy_mean"], yerr=row["accuracy_std"], fmt="o", capsize=3)
        ax.annotate(row["method"], (x, row["accuracy_mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters (head excluded; head-only plotted at 1)")
    ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
    ax.set_title("rotten-tomatoes, MiniLM-L6")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-examples", type=int, default=1600)
    parser.add_argument("--validation-examples", type=int, default=400)
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--only", nargs="+", help="method names to run (default: all)")
    parser.add_argument("--lm-train-examples", type=int, default=400)
    parser.add_argument("--no-lm", action="store_true", help="skip the SmolLM2 row")
    parser.add_argument("--resume", action="store_true", help="keep finished runs from <out>/quality_runs.json")
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.smoke:
        args.seeds, args.train_examples, args.validation_examples, args.epochs = [0], 32, 16, 1
        args.only, args.no_lm = args.only or ["head only", "DCFT k8"], True
    optim = OptimConfig(epochs=args.epochs, batch_size=32, max_length=48, eval_batch_size=256, logging_steps=50)
    splits = subsample(load_dataset(DataConfig()), args.train_examples, args.validation_examples)
    if args.smoke:
        splits = dataclasses.replace(splits, test=splits.test[:32])
    methods = [m for m in METHODS if not args.only or m.name in args.only]
    name = "quality_smoke" if args.smoke else "quality"
    runs_path = args.out / f"{name}_runs.json"
    saved = json.loads(runs_path.read_text()) if args.resume and runs_path.exists() else {"runs": [], "causal_lm": None}
    runs, lm = saved["runs"], saved.get("causal_lm")
    save = lambda: runs_path.write_text(json.dumps({"runs": runs, "causal_lm": lm}, indent=2))  # noqa: E731
    args.out.mkdir(parents=True, exist_ok=True)
    done = {(r["method"], r["seed"]) for r in runs}
    with tempfile.TemporaryDirectory() as work:
        for method in methods:
            for seed in (s for s in args.seeds if (method.name, s) not in done):
                runs.append(run_one(method, splits, seed, optim, Path(work)))
                save()  # after every run, so a stopped report loses at most one run
                print(f"{method.name:<20} seed {seed}: accuracy {100 * runs[-1]['accuracy']:.2f}  "
                      f"({runs[-1]['train_seconds']:.0f} s)", flush=True)  # fmt: skip
        if lm is None and not args.no_lm:
            lm = causal_lm_row(args.lm_train_examples, 300, optim, Path(work))
            save()
    order = [m.name for m in METHODS]
    runs.sort(key=lambda r: (order.index(r["method"]) if r["method"] in order else len(order), r["seed"]))
    rows = summarise(runs)
    notes = (f"Test accuracy on the fixed rotten-tomatoes test split ({len(splits.test)} reviews) with the real "
             f"MiniLM-L6; {len(splits.train)} training reviews (seeded sample), {args.epochs:g} epochs, length 48, "
             f"batch 32, validation on {len(splits.validation)} reviews (Trainer keeps the best epoch), seeds "
             f"{args.seeds}. `params` are the trainable adapter parameters without the 770-parameter classifier "
             "head (`params_with_head` includes it); full fine-tuning counts every backbone parameter. Learning "
             "rates: each family at the best of a one-seed sweep on this budget (LoRA r1: 2e-3 76.4, 5e-3 78.4, "
             "1e-2 78.9; DCFT k8: 5e-3 72.1, 2e-2 76.6, 5e-2 75.3); gamma 0.1 for DCFT. `train_seconds` are "
             "wall-clock on the machine below and only roughly comparable when other work shared it. "
             "F1 is blank (–) where a seed's run came from an interrupted earlier report that kept only accuracy. "
             "Regenerate: `python -m benchmarks.quality` (about an hour on 2 CPU cores; `--resume` keeps "
             "finished runs).")  # fmt: skip
    notes += "\n\n" + target_summary(rows) + " " + FINDINGS
    if lm:
        notes += (f"\n\nCausal LM: SmolLM2-135M held-out perplexity on {lm['test_examples']} test reviews: "
                  f"{lm['perplexity_before']:.2f} bare -> {lm['perplexity_after']:.2f} with a DCFT k8 adapter "
                  f"({lm['dcft_params']:,} parameters) trained on {lm['train_examples']} reviews "
                  f"in {lm['train_seconds']:.0f} s.")  # fmt: skip
    columns = [
        "method",
        "accuracy_mean",
        "accuracy_std",
        "f1_mean",
        "params",
        "params_with_head",
        "train_seconds",
        "seeds",
    ]
    path = write_report(name, "DCFT quality on rotten-tomatoes (MiniLM)", rows, columns, notes, out_dir=args.out)
    save()
    plot(rows, args.out / f"{name}.png")
    print(f"report: {path}")


if __name__ == "__main__":
    main()
