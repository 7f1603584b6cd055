"""Quality protocol (issue 14): DCFT against LoRA, PEFT LoKr, head-only and full fine-tuning on
two classification tasks with the real MiniLM, and SmolLM2-135M perplexity bare vs DCFT vs LoRA.

    python -m benchmarks.quality --resume   # the whole protocol: many hours on 2 CPU cores
    python -m benchmarks.quality --smoke    # well under a minute: what the test suite runs

Protocol, the same for every family:
- Tasks: `rotten-tomatoes` (fresh or rotten) and `rotten-tomatoes-subjectivity` (review or plot
  summary sentence), each with its fixed train/validation/test split (training/data.py).
- Tuning reads the validation split only. Each family's representative (DCFT k8, LoRA r1,
  LoKr r1, head only, full fine-tuning) runs a staged grid: the first stage tries the learning
  rates, each later stage tries one more knob's values on top of the best settings so far; the
  best validation accuracy wins (ties keep the earlier). DCFT, LoRA and LoKr get 7 trials each,
  head-only and full fine-tuning 3 learning rates (they have no other knob). Where the best
  learning rate sits at the edge of its grid, every family tries one more step beyond that edge
  before the next stage (one trial more). Every member of a
  family (DCFT k2..k12 and strides, LoRA r1..r8) uses its family's choice.
- Final runs: the chosen settings, the full training split, 3 epochs with the best epoch on
  validation kept and early stopping (patience 1), seeds 0, 1, 2; the test split is read once per
  final run. Every classification run: batch 32, length 64, batches of similar-length texts.
- Causal LM: SmolLM2 bare vs DCFT k8 vs LoRA r1 on the same targets (all attention and MLP
  projections), data and budget: the first 800 training reviews for one epoch (batch 8, length
  48), 100 validation and 300 test reviews; scale 1, DCFT's zero-delta start, no orthogonal
  penalty; the learning rate of each (1e-3, 3e-3, 1e-2, 3e-2, 1e-1) is chosen on validation perplexity
  (0.1 was added after DCFT chose 0.03, the edge of the first grid; both families try it: the
  step beyond an edge, as in the classification grids). DCFT k8 s4 and k8 s2 (overlapping
  strides, more parameters) then run once each with DCFT k8's chosen settings: how much of
  DCFT's gap to LoRA r1 they close.

Every run is saved to `<out>/quality_protocol_runs.json` as it finishes (`--resume` skips the
finished ones). `--workers N` (a GPU fits many MiniLM runs at once) first runs the classification
protocol in N processes: every (task, family) tuning grid in its own process, then every final
run (task, method, seed), each worker resuming from a copy of the runs and merged back as it finishes; the
sequential pass that follows then finds those runs done (and runs any a failed worker left).
Until every run has finished, the report goes to `quality_partial.{json,md,png}`
and says how far it got; `quality.{json,md,png}` is written only by a complete protocol.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import torch
from transformers import set_seed

from adapters.config import DCFTConfig
from adapters.injection import default_head_modules, inject_adapter
from backbones.loading import load_backbone, load_tokenizer, pick_device
from backbones.shipped import MINILM, SMOLLM2, resolve_model_dir
from benchmarks.report import RESULTS_DIR, environment, markdown_table, write_report
from training.config import OptimConfig
from training.data import ROTTEN_TOMATOES, ROTTEN_TOMATOES_TEXT, SUBJECTIVITY, DataConfig, DatasetSplits, load_dataset
from training.evaluate import evaluate_model
from training.train import fit

TASKS = {"sentiment": ROTTEN_TOMATOES, "subjectivity": SUBJECTIVITY}
LORA_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
LM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # DCFT's "all"


@dataclasses.dataclass(frozen=True)
class Settings:
    """What tuning chooses. Knobs a family does not have keep their defaults."""

    lr: float
    part_lr_multiplier: float = 1.0  # DCFT's kernel C, LoRA's B (LoRA+)
    scale: float = 1.0  # DCFT alpha / rank; LoRA and LoKr alpha / r
    init: str = "default"  # DCFT zero_delta|paper; LoRA kaiming|gaussian; LoKr default|lycoris
    gamma: float = 0.0  # DCFT's orthogonal penalty
    dropout: float = 0.0  # LoRA dropout, LoKr rank dropout


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    family: str  # head | full | lora | lokr | dcft
    rank: int = 1
    kernel: int = 8
    stride: int | None = None


@dataclasses.dataclass(frozen=True)
class Search:
    """A staged grid: stage 0 tries learning rates, each later stage one more knob."""

    start: Settings
    stages: tuple[tuple[str, tuple], ...]
    lr_beyond: tuple[float, float] | None = None  # tried next when the best lr is the grid's (lowest, highest)

    def trials(self) -> int:
        return len(self.stages[0][1]) + sum(len(values) - 1 for _, values in self.stages[1:])

    def beyond(self, lr: float) -> float | None:
        """The learning rate one step past the edge of the grid that `lr` sits on, if it sits on one:
        a best value at the edge says the optimum may lie outside what was tried."""
        grid = self.stages[0][1]
        if self.lr_beyond is None or min(grid) < lr < max(grid):
            return None
        return self.lr_beyond[0] if lr == min(grid) else self.lr_beyond[1]


SEARCH = {
    "dcft": Search(Settings(2e-2, init="zero_delta", gamma=0.1), (
        ("lr", (5e-3, 2e-2, 5e-2)), ("part_lr_multiplier", (1.0, 10.0)), ("scale", (1.0, 4.0)),
        ("init", ("zero_delta", "paper")), ("gamma", (0.1, 0.0))), lr_beyond=(2e-3, 1e-1)),
    "lora": Search(Settings(1e-2, init="kaiming"), (
        ("lr", (3e-3, 1e-2, 3e-2)), ("part_lr_multiplier", (1.0, 16.0)), ("scale", (1.0, 4.0)),
        ("init", ("kaiming", "gaussian")), ("dropout", (0.0, 0.1))), lr_beyond=(1e-3, 1e-1)),
    "lokr": Search(Settings(1e-2), (
        ("lr", (1e-3, 3e-3, 1e-2, 3e-2)), ("scale", (1.0, 4.0)), ("init", ("default", "lycoris")),
        ("dropout", (0.0, 0.1))), lr_beyond=(3e-4, 1e-1)),
    "head": Search(Settings(1e-2), (("lr", (3e-3, 1e-2, 3e-2)),), lr_beyond=(1e-3, 1e-1)),
    "full": Search(Settings(5e-5), (("lr", (2e-5, 5e-5, 1e-4)),), lr_beyond=(1e-5, 2e-4)),
}
LM_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
LM_SEARCH = {
    "dcft": Search(Settings(1e-3, init="zero_delta"), (("lr", LM_LRS),)),
    "lora": Search(Settings(1e-3, init="kaiming"), (("lr", LM_LRS),)),
}
METHODS = [
    Method("head only", "head"),
    Method("full fine-tuning", "full"),
    *[Method(f"LoRA r{r}", "lora", rank=r) for r in (1, 2, 4, 8)],
    Method("LoKr r1", "lokr"),
    *[Method(f"DCFT k{k}", "dcft", kernel=k) for k in (2, 4, 8, 12)],
    Method("DCFT k8 s4", "dcft", kernel=8, stride=4),
    Method("DCFT k8 s2", "dcft", kernel=8, stride=2),
]
BY_NAME = {m.name: m for m in METHODS}
LM_DCFT_MEMBERS = ("DCFT k8 s4", "DCFT k8 s2")  # LM finals beyond the headline, with DCFT k8's settings
REPRESENTATIVE = {"dcft": "DCFT k8", "lora": "LoRA r1", "lokr": "LoKr r1", "head": "head only",
                  "full": "full fine-tuning"}
HEADLINE, REST = ("dcft", "lora"), ("head", "full", "lokr")


# --- one run ---------------------------------------------------------------------------------


def prepare(method: Method, settings: Settings, model: torch.nn.Module, targets: list[str] | None = None) -> None:
    """Make only what `method` trains trainable (the head too, when the model has one)."""
    heads = default_head_modules(model, "seq_cls") if targets is None else []
    if method.family == "full":
        return
    if method.family == "head":
        model.requires_grad_(False)
        model.get_submodule(heads[0]).requires_grad_(True)
        return
    if method.family == "dcft":
        dcft = DCFTConfig(kernel_size=method.kernel, stride=method.stride, alpha=settings.scale, init=settings.init)
        inject_adapter(model, dcft, heads)
        return
    model.__dict__["_peft"] = peft_wrapper(method, settings, model, targets or LORA_TARGETS, heads)


def peft_wrapper(method: Method, settings: Settings, model: torch.nn.Module, targets: list[str],
                 heads: list[str]) -> torch.nn.Module:
    """PEFT LoRA or LoKr injected into `model` in place (the wrapper is kept alive on it)."""
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


def run_classifier(task: str, method: Method, settings: Settings, seed: int, final: bool, optim: OptimConfig,
                   splits: DatasetSplits, work: Path) -> dict:
    """Train one method with one setting on one task; a final run also reads the test split once."""
    set_seed(seed)
    device = pick_device()
    model_dir = resolve_model_dir(MINILM)
    model = load_backbone(model_dir, "seq_cls", len(splits.labels), device=device)
    prepare(method, settings, model)
    params, head = count_parameters(model)
    tuned = optim.model_copy(update={"learning_rate": settings.lr, "seed": seed, "gamma": settings.gamma,
                                     "kernel_lr_multiplier": settings.part_lr_multiplier})
    report = ("validation", "test") if final else ("validation",)
    result = fit(model, load_tokenizer(model_dir), splits, "seq_cls", tuned, work, device, settings.gamma, report)
    epochs = max((entry.get("epoch", 0) for entry in result.history), default=0)
    row = {"validation_accuracy": result.metrics["validation_accuracy"], "params": params,
           "params_with_head": params + head, "train_seconds": round(result.train_seconds, 1),
           "epochs_run": round(epochs, 2), "machine": machine()}
    if final:
        row |= {"test_accuracy": result.metrics["test_accuracy"], "test_f1": result.metrics["test_f1"]}
    return row


# --- the protocol: a sequence of runs, each saved as it finishes -------------------------------


class RunStore:
    """Finished runs by key, saved after every run; `--resume` starts from the saved file."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        saved = json.loads(path.read_text()) if resume and path.exists() else {"runs": []}
        self.runs: list[dict] = saved["runs"]

    @staticmethod
    def key(**fields) -> str:
        return json.dumps(fields, sort_keys=True, default=str)

    def get(self, key: str) -> dict | None:
        return next((r for r in self.runs if r["key"] == key), None)

    def add(self, key: str, row: dict) -> dict:
        self.runs.append({"key": key, **row})
        self.save()
        return self.runs[-1]

    def merge(self, other: Path) -> int:
        """The runs of another store's file that this one lacks; returns how many were added."""
        if not other.exists():
            return 0
        known = {r["key"] for r in self.runs}
        new = [r for r in json.loads(other.read_text())["runs"] if r["key"] not in known]
        if new:
            self.runs += new
            self.save()
        return len(new)

    def save(self) -> None:
        write_atomically(self.path, json.dumps({"runs": self.runs}, indent=2))


def write_atomically(path: Path, text: str) -> None:
    """Readers (a merging parent, a resumed run) see the old file or the new one, never half of one."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def families_of(wanted: tuple[str, ...], only: list[str] | None) -> tuple[str, ...]:
    """The wanted families that hold a method named in `only` (all of them without `only`)."""
    if not only:
        return wanted
    return tuple(f for f in wanted if any(BY_NAME[n].family == f for n in only if n in BY_NAME))


class Protocol:
    def __init__(self, args: argparse.Namespace, store: RunStore, work: Path):
        self.args, self.store, self.work = args, store, work
        self.optim = OptimConfig(epochs=args.epochs, batch_size=32, max_length=64, eval_batch_size=256,
                                 logging_steps=100, early_stopping_patience=1, group_by_length=True)
        self._splits: dict[str, DatasetSplits] = {}
        self.on_run = lambda: None

    def splits(self, task: str) -> DatasetSplits:
        if task not in self._splits:
            splits = load_dataset(DataConfig(source=TASKS[task]))
            if self.args.smoke:  # a few examples of each split, for the test suite
                splits = dataclasses.replace(splits, train=splits.train[:32], validation=splits.validation[:16],
                                             test=splits.test[:32])
            self._splits[task] = splits
        return self._splits[task]

    def run(self, task: str, phase: str, method: Method, settings: Settings, seed: int) -> dict:
        key = self.store.key(task=task, phase=phase, method=method.name, settings=dataclasses.asdict(settings),
                             seed=seed)
        if (done := self.store.get(key)) is not None:
            return done
        row = run_classifier(task, method, settings, seed, phase == "final", self.optim, self.splits(task), self.work)
        done = self.store.add(key, {"task": task, "phase": phase, "method": method.name, "family": method.family,
                                    "settings": dataclasses.asdict(settings), "seed": seed, **row})
        score = f"val {100 * row['validation_accuracy']:.2f}" + (
            f" test {100 * row['test_accuracy']:.2f}" if "test_accuracy" in row else ""
        )
        print(f"{task:<12} {phase:<5} {method.name:<17} seed {seed} {score} ({row['train_seconds']:.0f} s)", flush=True)
        self.on_run()
        return done

    def tune(self, task: str, family: str) -> Settings:
        """The staged grid on the family's representative; returns the chosen settings."""
        search, method = SEARCH[family], BY_NAME[REPRESENTATIVE[family]]
        scores: dict[Settings, float] = {}  # in trial order, so max() keeps the earlier of a tie

        def trial(settings: Settings) -> Settings:
            scores[settings] = self.run(task, "tune", method, settings, seed=0)["validation_accuracy"]
            return max(scores, key=scores.__getitem__)

        best = search.start
        for knob, values in self.stages(search):
            base = best
            for value in values:
                best = trial(dataclasses.replace(base, **{knob: value}))
            if knob == "lr" and not self.args.smoke and (lr := search.beyond(best.lr)) is not None:
                best = trial(dataclasses.replace(base, lr=lr))
        return best

    def stages(self, search: Search) -> tuple[tuple[str, tuple], ...]:
        if self.args.smoke:  # one trial per family
            return ((search.stages[0][0], search.stages[0][1][:1]),)
        return search.stages

    def finals(self, task: str, family: str, members: bool) -> None:
        settings = self.tune(task, family)
        if self.args.tune_only:
            return
        names = [m.name for m in METHODS if m.family == family] if members else [REPRESENTATIVE[family]]
        for name in (n for n in names if not self.args.only or n in self.args.only):
            for seed in self.args.seeds:
                self.run(task, "final", BY_NAME[name], settings, seed)

    def families(self, wanted: tuple[str, ...]) -> tuple[str, ...]:
        return families_of(wanted, self.args.only)

    def classification(self) -> Iterator[None]:
        """The headline comparison first (DCFT k8 vs LoRA r1 per task), then the rest; yields after each."""
        for task in self.args.tasks:
            for family in self.families(HEADLINE):
                self.finals(task, family, members=False)
            yield
        for task in self.args.tasks:
            for family in self.families(REST + HEADLINE):
                self.finals(task, family, members=True)
            yield


# --- many runs at once --------------------------------------------------------------------------


MERGE_EVERY_S = 20


def run_workers(args: argparse.Namespace, store: RunStore, work: Path, on_merge=lambda: None) -> None:
    """The classification protocol's runs in `args.workers` processes, merged into `store`:
    first every (task, family) tuning grid (its stages depend on each other, the grids do not),
    then every final run (task, method, seed), which needs only its family's tuning runs.
    Each worker's runs are merged as they finish, so a worker stopped part way (a time limit,
    the machine going away) keeps what it finished."""
    families = families_of(HEADLINE + REST, args.only)
    tunes = [(task, [REPRESENTATIVE[f]], args.seeds[:1], True) for task in args.tasks for f in families]
    finals = [(task, [m.name], [seed], False) for task in args.tasks for m in METHODS for seed in args.seeds
              if m.family in families and (not args.only or m.name in args.only)]
    for stage in (tunes,) if args.tune_only else (tunes, finals):
        with ThreadPoolExecutor(args.workers) as pool:
            jobs = {pool.submit(_worker, args, store, work, *job): job for job in stage}
            added = dict.fromkeys(jobs, 0)
            pending = set(jobs)
            while pending:  # merged here, in this thread only
                done, pending = wait(pending, timeout=MERGE_EVERY_S, return_when=FIRST_COMPLETED)
                before = len(store.runs)
                for future in jobs:
                    added[future] += store.merge(worker_runs(work, store, *jobs[future][:3]))
                if len(store.runs) > before:
                    on_merge()
                for future in done:
                    task, names, seeds, _ = jobs[future]
                    if (error := future.exception()) is not None:  # the sequential pass after runs what it left
                        print(error, flush=True)
                    else:
                        print(f"worker {task} {', '.join(names)} seeds {seeds}: {added[future]} new runs", flush=True)


def worker_runs(work: Path, store: RunStore, task: str, names: list[str], seeds: list[int]) -> Path:
    """Where the worker for (task, names, seeds) keeps its copy of the runs."""
    name = f"{task}-{'-'.join(names).replace(' ', '_')}-{'-'.join(map(str, seeds))}"
    return work / "workers" / name / store.path.name


def _worker(args: argparse.Namespace, store: RunStore, work: Path, task: str, names: list[str], seeds: list[int],
            tune_only: bool) -> None:
    """One `python -m benchmarks.quality` on its own copy of the runs, which the parent merges from."""
    runs = worker_runs(work, store, task, names, seeds)
    runs.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(runs, store.path.read_text())
    command = [sys.executable, "-m", "benchmarks.quality", "--resume", "--no-lm", "--tasks", task, "--only", *names,
               "--seeds", *map(str, seeds), "--epochs", str(args.epochs), "--out", str(runs.parent)]
    command += ["--tune-only"] * tune_only + ["--smoke"] * args.smoke
    threads = str(max(1, (os.cpu_count() or 1) // args.workers))  # the workers share the host's cores
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": threads}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker {task} {names} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")


# --- causal LM ---------------------------------------------------------------------------------


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
    prepare(method, settings, model, targets=LM_TARGETS)
    params, _ = count_parameters(model)
    report = ("validation", "test") if final else ("validation",)
    tuned = optim.model_copy(update={"learning_rate": settings.lr})
    result = fit(model, tokenizer, splits, "causal_lm", tuned, work, device, 0.0, report)
    return {**{f"{s}_perplexity": result.metrics[f"{s}_perplexity"] for s in report}, "params": params,
            "train_seconds": round(result.train_seconds, 1), "train_examples": len(splits.train),
            "machine": machine()}


def causal_lm(args: argparse.Namespace, store: RunStore, work: Path, on_run=lambda: None) -> None:
    """Bare, then each family's lr chosen on validation perplexity, then its final run."""

    def run(method: Method | None, settings: Settings | None, phase: str) -> dict:
        name = method.name if method else "bare"
        key = store.key(task="lm", phase=phase, method=name, settings=settings and dataclasses.asdict(settings))
        if (done := store.get(key)) is None:
            row = run_lm(method, settings, phase == "final", args, work)
            done = store.add(key, {"task": "lm", "phase": phase, "method": name,
                                   "settings": settings and dataclasses.asdict(settings), **row})
            print(f"lm           {phase:<5} {name:<17} {row}", flush=True)
            on_run()
        return done

    run(None, None, "final")
    chosen = {}
    for family, method in (("dcft", Method("DCFT k8", "dcft")), ("lora", Method("LoRA r1", "lora"))):
        search = LM_SEARCH[family]
        trials = [dataclasses.replace(search.start, lr=lr) for lr in search.stages[0][1][: 1 if args.smoke else None]]
        scores = [run(method, s, "tune")["validation_perplexity"] for s in trials]
        chosen[family] = trials[scores.index(min(scores))]
        run(method, chosen[family], "final")
    if not args.smoke:  # how much of DCFT k8's gap overlapping strides close, at DCFT k8's chosen settings
        for name in LM_DCFT_MEMBERS:
            run(BY_NAME[name], chosen["dcft"], "final")


# --- the report --------------------------------------------------------------------------------


def summarise(runs: list[dict], task: str) -> list[dict]:
    finals = [r for r in runs if r["task"] == task and r["phase"] == "final"]
    rows = []
    for method in [m.name for m in METHODS if any(r["method"] == m.name for r in finals)]:
        mine = [r for r in finals if r["method"] == method]
        acc = [100 * r["test_accuracy"] for r in mine]
        rows.append({"task": task, "method": method, "accuracy_mean": statistics.mean(acc),
                     "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "validation_mean": statistics.mean(100 * r["validation_accuracy"] for r in mine),
                     "params": mine[0]["params"], "params_with_head": mine[0]["params_with_head"],
                     "train_seconds": statistics.mean(r["train_seconds"] for r in mine), "seeds": len(mine),
                     "settings": mine[0]["settings"]})
    return rows


def pareto(rows: list[dict]) -> list[dict]:
    """The rows no other row beats with as few or fewer parameters."""
    front, best = [], float("-inf")
    for row in sorted(rows, key=lambda r: (r["params"], -r["accuracy_mean"])):
        if row["accuracy_mean"] > best:
            front.append(row)
            best = row["accuracy_mean"]
    return front


def target_lines(rows: list[dict], task: str) -> list[str]:
    by_name = {r["method"]: r for r in rows}
    dcft, lora = by_name.get("DCFT k8"), by_name.get("LoRA r1")
    if not (dcft and lora):
        return [f"{task}: DCFT k8 and LoRA r1 are not both finished yet."]
    gap, fewer = dcft["accuracy_mean"] - lora["accuracy_mean"], lora["params"] / dcft["params"]
    verdict = "meets" if gap >= -1 and fewer >= 5 else "misses"
    lines = [f"{task}: DCFT k8 {dcft['accuracy_mean']:.1f} ± {dcft['accuracy_std']:.1f} vs LoRA r1 "
             f"{lora['accuracy_mean']:.1f} ± {lora['accuracy_std']:.1f} ({gap:+.1f} points) with {fewer:.1f}x fewer "
             f"adapter parameters: {verdict} the target (within 1 point, >= 5x fewer)."]
    dcfts = [r for r in rows if r["method"].startswith("DCFT")]
    if verdict == "misses" and dcfts:
        best = max(dcfts, key=lambda r: r["accuracy_mean"])
        lines.append(f"Best DCFT setting: {best['method']} {best['accuracy_mean']:.1f} with {best['params']:,} "
                     f"parameters ({best['accuracy_mean'] - lora['accuracy_mean']:+.1f} vs LoRA r1).")
    small = [r for r in dcfts if r["params"] < 20_000]
    if small:
        shown = ", ".join(f"{r['method']} {r['accuracy_mean']:.1f} ({r['params']:,})" for r in small)
        lines.append(f"Below 20k parameters LoRA has no point (its smallest, r1, has {lora['params']:,}); DCFT there: "
                     f"{shown}, against LoRA r1's {lora['accuracy_mean']:.1f}.")
    return lines


def lm_lines(runs: list[dict]) -> tuple[list[dict], list[str]]:
    finals = {r["method"]: r for r in runs if r["task"] == "lm" and r["phase"] == "final"}
    rows = [{"method": name, "validation_perplexity": r["validation_perplexity"],
             "test_perplexity": r["test_perplexity"], "params": r["params"], "train_seconds": r["train_seconds"],
             "lr": (r["settings"] or {}).get("lr"), "machine": r["machine"]} for name, r in finals.items()]
    if not ("DCFT k8" in finals and "LoRA r1" in finals):
        return rows, []
    ratio = finals["DCFT k8"]["test_perplexity"] / finals["LoRA r1"]["test_perplexity"]
    verdict = "meets" if ratio <= 1.05 else "misses"
    lines = [f"LM: DCFT k8 perplexity is {100 * (ratio - 1):+.1f}% of LoRA r1's: {verdict} the target (within 5%)."]
    dcfts = [r for r in rows if r["method"].startswith("DCFT")]
    if verdict == "misses" and len(dcfts) > 1:
        best = min(dcfts, key=lambda r: r["test_perplexity"])
        lora = finals["LoRA r1"]
        excess = best["test_perplexity"] / lora["test_perplexity"] - 1
        lines.append(f"LM: the best DCFT setting, {best['method']} ({best['params']:,} parameters, "
                     f"{lora['params'] / best['params']:.1f}x fewer than LoRA r1), reaches perplexity "
                     f"{best['test_perplexity']:.1f}, {100 * excess:+.1f}% of LoRA r1's.")
    return rows, lines


def edge_lines(runs: list[dict]) -> list[str]:
    """Families whose chosen learning rate sits at the edge of what was tried (a wider grid might do better):
    the edge of the grid where there is no step beyond it, else the step beyond."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in runs if r["phase"] == "final"):
        searches = LM_SEARCH if task == "lm" else SEARCH
        for method in dict.fromkeys(r["method"] for r in runs if r["task"] == task and r["phase"] == "final"):
            family = next((f for f, name in REPRESENTATIVE.items() if name == method), None)
            row = next(r for r in runs if r["task"] == task and r["phase"] == "final" and r["method"] == method)
            if family not in searches or not row["settings"]:
                continue
            search, lr = searches[family], row["settings"]["lr"]
            grid = search.stages[0][1]
            if search.lr_beyond and lr in search.lr_beyond:
                lines.append(f"{task}: {method}'s chosen learning rate {lr:g} lies one step beyond its grid "
                             f"{list(grid)}, the step the protocol adds at an edge; a wider grid might do better.")
            elif not search.lr_beyond and lr in (min(grid), max(grid)):
                lines.append(f"{task}: {method}'s chosen learning rate {lr:g} is at the edge of its grid {list(grid)}.")
    return lines


def grid_table(runs: list[dict], task: str) -> str:
    tune = [r for r in runs if r["task"] == task and r["phase"] == "tune"]
    rows = [{"method": r["method"], **{k: v for k, v in r["settings"].items()}, "validation": 100 * r[
        "validation_accuracy"], "train_seconds": r["train_seconds"]} for r in tune]
    columns = ["method", *Settings.__dataclass_fields__, "validation", "train_seconds"]
    return markdown_table(rows, columns) if rows else "(no tuning run finished yet)"


def plot(rows_by_task: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, rows in rows_by_task.items() if rows]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6.5 * max(1, len(tasks)), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        rows = rows_by_task[task]
        for row in rows:
            x = max(row["params"], 1)
            color = {"dcft": "C0", "lora": "C1", "lokr": "C2"}.get(BY_NAME[row["method"]].family, "C7")
            ax.errorbar(x, row["accuracy_mean"], yerr=row["accuracy_std"], fmt="o", color=color, capsize=3)
            ax.annotate(row["method"], (x, row["accuracy_mean"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        front = pareto(rows)
        ax.step([max(r["params"], 1) for r in front], [r["accuracy_mean"] for r in front], where="post",
                color="k", alpha=0.4, label="Pareto frontier")
        ax.set_xscale("log")
        ax.set_xlabel("trainable adapter parameters (head excluded; head only at 1)")
        ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
        ax.set_title(f"{task} ({TASKS[task]}), MiniLM-L6")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(args: argparse.Namespace, store: RunStore, complete: bool) -> Path:
    runs = store.runs
    name = "quality_smoke" if args.smoke else "quality" if complete else "quality_partial"
    rows_by_task = {task: summarise(runs, task) for task in args.tasks}
    lm_rows, lm_target = lm_lines(runs)
    status = "Complete protocol." if complete else (
        "SMOKE run: a few examples and one trial per family; it checks the machinery, not quality."
        if args.smoke else (
        f"PARTIAL: {len(runs)} runs finished so far; the protocol is still running (or was stopped). "
        "These are not the final figures."))
    notes = [
        status,
        "`train_seconds` is wall-clock on the machine of its row. On a shared CPU it also counts the other "
        "work running there (a row whose machine names a load shows the 1-minute load average at its end): "
        "compare times only roughly.",
        __doc__.split("\n\n", 2)[2].split("Every run is saved")[0].strip(),
        *[line for task in args.tasks for line in target_lines(rows_by_task[task], task)],
        *lm_target,
        *edge_lines(runs),
    ]
    sections = [f"## Tuning grid: {task} (validation accuracy, %; seed 0)\n\n{grid_table(runs, task)}"
                for task in args.tasks]
    if lm_rows:
        lm_tune = [{"method": r["method"], "lr": r["settings"]["lr"], "validation_perplexity": r[
            "validation_perplexity"], "train_seconds": r["train_seconds"]} for r in runs if r["task"] == "lm" and r[
            "phase"] == "tune"]
        sections.append("## Causal LM (SmolLM2-135M, held-out reviews)\n\n" + markdown_table(lm_rows, list(lm_rows[0]))
                        + "\n\nLearning-rate trials (validation only):\n\n"
                        + (markdown_table(lm_tune, list(lm_tune[0])) if lm_tune else "(none)"))
    finals = [{k: r.get(k) for k in ("task", "method", "seed", "validation_accuracy", "test_accuracy", "test_f1",
               "params", "train_seconds", "epochs_run", "machine")} for r in runs if r["phase"] == "final"
              and r["task"] != "lm"]
    sections.append("## Final runs, per seed\n\n" + (markdown_table(finals, list(finals[0])) if finals else "(none)"))
    rows = [row for task in args.tasks for row in rows_by_task[task]]
    columns = ["task", "method", "accuracy_mean", "accuracy_std", "validation_mean", "params", "params_with_head",
               "train_seconds", "seeds"]
    text = "\n\n".join(notes) + "\n\nMean ± std of test accuracy over seeds (the table below), then the detail:\n\n" + (
        "\n\n".join(sections))
    path = write_report(name, "DCFT quality protocol (MiniLM classification, SmolLM2 perplexity)", rows, columns,
                        text, out_dir=args.out)
    payload = json.loads((args.out / f"{name}.json").read_text())
    payload |= {"complete": complete, "runs": runs, "causal_lm": lm_rows}
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    plot(rows_by_task, args.out / f"{name}.png")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--only", nargs="+", help="method names to run (default: all)")
    parser.add_argument("--lm-model", default=SMOLLM2, help="causal LM backbone (folder or alias)")
    parser.add_argument("--lm-train-examples", type=int, default=800)
    parser.add_argument("--no-lm", action="store_true", help="skip the causal-LM comparison")
    parser.add_argument("--resume", action="store_true", help="keep the runs in <out>/quality_protocol_runs.json")
    parser.add_argument("--report-only", action="store_true", help="write the partial report from the saved runs")
    parser.add_argument("--smoke", action="store_true", help="a few examples, one trial per family (tests)")
    parser.add_argument("--workers", type=int, default=1, help="classification runs at once (see above)")
    parser.add_argument("--tune-only", action="store_true", help="the tuning grids only, no final runs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.smoke:
        args.tasks, args.seeds, args.epochs = args.tasks[:1], [0], 1.0
        args.only = args.only or ["head only", "DCFT k8", "LoRA r1"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs_name = "quality_smoke_runs.json" if args.smoke else "quality_protocol_runs.json"
    store = RunStore(args.out / runs_name, args.resume or args.report_only)
    if args.report_only:
        print(f"report: {write(args, store, complete=False)}")
        return
    store.save()  # workers copy it
    with tempfile.TemporaryDirectory() as work:
        def partial_report() -> None:
            if not args.smoke:
                write(args, store, complete=False)

        if args.workers > 1:
            run_workers(args, store, Path(work), on_merge=partial_report)
        protocol = Protocol(args, store, Path(work))
        protocol.on_run = partial_report
        if not args.no_lm:  # first: the shortest complete comparison (about 2 hours on 2 CPU cores)
            causal_lm(args, store, Path(work), protocol.on_run)
        for _ in protocol.classification():  # the headline (DCFT k8 vs LoRA r1) on every task, then the rest
            pass
    complete = not args.only and not args.no_lm and args.tasks == list(TASKS)
    print(f"report: {write(args, store, complete and not args.smoke)}")


if __name__ == "__main__":
    main()
