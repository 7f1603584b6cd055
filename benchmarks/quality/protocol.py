"""The protocol's order of runs: the classification grids and finals, and the causal-LM comparison.
Each run is looked up in the store first, so a resumed protocol skips what it finished."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

from benchmarks.quality.choice import at_or_below, best, finals_at, settle
from benchmarks.quality.grid import (
    BY_NAME,
    HEADLINE,
    LM_DCFT_MEMBERS,
    LM_SEARCH,
    LONG_EPOCHS,
    LONG_PATIENCE,
    METHODS,
    REPRESENTATIVE,
    REST,
    SEARCH,
    TASKS,
    Method,
    Search,
    Settings,
    checked,
    families_of,
)
from benchmarks.quality.runs import run_classifier, run_lm
from benchmarks.quality.store import RunStore
from training.config import OptimConfig
from training.data import DataConfig, DatasetSplits, load_dataset


class Protocol:
    def __init__(self, args: argparse.Namespace, store: RunStore, checkpoints: Path):
        """`checkpoints`: where each unfinished run keeps its epochs, so that `--resume` continues it."""
        self.args, self.store, self.checkpoints = args, store, checkpoints
        self.optim = OptimConfig(epochs=args.epochs, batch_size=32, max_length=64, eval_batch_size=256,
                                 logging_steps=100, early_stopping_patience=1, group_by_length=True)
        self.long_optim = self.optim.model_copy(update={"epochs": LONG_EPOCHS,
                                                        "early_stopping_patience": LONG_PATIENCE})
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
        optim = self.long_optim if phase == "long" else self.optim
        work = self.checkpoints / hashlib.sha256(key.encode()).hexdigest()[:16]
        row = run_classifier(task, method, settings, seed, phase != "tune", optim, self.splits(task), work)
        shutil.rmtree(work, ignore_errors=True)
        done = self.store.add(key, {"task": task, "phase": phase, "method": method.name, "family": method.family,
                                    "settings": dataclasses.asdict(settings), "seed": seed, **row})
        score = f"val {100 * row['validation_accuracy']:.2f}" + (
            f" test {100 * row['test_accuracy']:.2f}" if "test_accuracy" in row else ""
        )
        print(f"{task:<12} {phase:<5} {method.name:<17} seed {seed} {score} ({row['train_seconds']:.0f} s)", flush=True)
        self.on_run()
        return done

    def tune(self, task: str, family: str) -> dict[Settings, float]:
        """The staged grid on the family's representative; returns each trial's validation accuracy."""
        search, method = SEARCH[family], BY_NAME[REPRESENTATIVE[family]]
        scores: dict[Settings, float] = {}  # in trial order, so best() keeps the earlier of a tie

        def trial(settings: Settings) -> Settings:
            scores[settings] = self.run(task, "tune", method, settings, seed=0)["validation_accuracy"]
            return best(scores)

        chosen = search.start
        for knob, values in self.grid_stages(search):
            base = chosen
            for value in values:
                chosen = trial(dataclasses.replace(base, **{knob: value}))
            if knob == "lr" and not self.args.smoke and (lr := search.beyond(chosen.lr)) is not None:
                chosen = trial(dataclasses.replace(base, lr=lr))
        return scores

    def grid_stages(self, search: Search) -> tuple[tuple[str, tuple], ...]:
        if self.args.smoke:  # one trial per family
            return ((search.stages[0][0], search.stages[0][1][:1]),)
        return search.stages

    def choice(self, task: str, family: str) -> Settings:
        """The settings every member of the family starts from (choice.py): the best trial, unless the
        representative's finals collapse at it; each candidate's finals run here, every seed."""
        return settle(self.tune(task, family), self.finals_of(task, BY_NAME[REPRESENTATIVE[family]]))[-1]

    def finals_of(self, task: str, method: Method) -> Callable[[Settings], list[dict]]:
        """What `settle` asks for: `method`'s finals at some settings, run here on every seed."""

        def finals(settings: Settings) -> list[dict]:
            for seed in self.args.seeds:
                self.run(task, "final", method, settings, seed)
            return finals_at(self.store.runs, task, method.name, settings)  # with seeds other workers ran

        return finals

    def long(self, task: str, family: str) -> None:
        """The longer-budget check of the family's checked methods at its choice: does more training move
        the headline?"""
        only = self.args.only
        names = [n for n in checked(task) if BY_NAME[n].family == family and (not only or n in only)]
        if names:
            settings = self.choice(task, family)
            for name in names:
                for seed in self.args.seeds:
                    self.run(task, "long", BY_NAME[name], settings, seed)

    def members(self, task: str, family: str) -> None:
        """The family's other members' finals, each from its family's choice, and stepping down the grid
        alone where its own finals collapse (choice.py)."""
        below = at_or_below(self.tune(task, family), self.choice(task, family))
        names = [m.name for m in METHODS if m.family == family and m.name != REPRESENTATIVE[family]]
        for name in (n for n in names if not self.args.only or n in self.args.only):
            settle(below, self.finals_of(task, BY_NAME[name]))

    def classification(self) -> None:
        """The headline (DCFT k8 vs LoRA r1 per task) and its longer-budget check first, then the rest;
        `--stages` picks stages (a worker runs one)."""
        plan = (("tune", HEADLINE), ("choice", HEADLINE), ("long", HEADLINE), ("tune", REST), ("choice", REST),
                ("members", HEADLINE + REST))
        for stage, wanted in plan:
            if stage in self.args.stages:
                for task in self.args.tasks:
                    for family in families_of(wanted, self.args.only):
                        getattr(self, stage)(task, family)


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
