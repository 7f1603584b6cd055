"""Which settings a family's final runs use. Tuning picks the best trial on seed 0's validation; a pick
whose final runs collapse (diverge to the majority class) on any seed trains on some seeds only, which
is no usable choice. So the family's best trial at a lower learning rate replaces it (divergence is a
learning rate too high for that seed), and so on down while trials remain. Every family gets the same
rule. Pure functions of the runs: the protocol asks them what to run next, the report which finals count.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from benchmarks.quality.grid import BY_NAME, MAJORITY, REPRESENTATIVE, Settings


def curve_of(run: dict) -> list[float]:
    """Validation accuracy (%) per epoch; runs from before the curve was recorded give their best only."""
    return run.get("validation_by_epoch") or [100 * run["validation_accuracy"]]


def collapsed(run: dict) -> bool:
    """Whether a final run fell to the majority-class rate on validation at some epoch (it diverged)."""
    return min(curve_of(run)) <= MAJORITY[run["task"]] + 1


def trial_scores(runs: list[dict], task: str, method: str) -> dict[Settings, float]:
    """Validation accuracy of each tuning trial of `method` on `task`, in the order they ran."""
    return {Settings(**r["settings"]): r["validation_accuracy"] for r in runs
            if r["task"] == task and r["phase"] == "tune" and r["method"] == method}


def finals_at(runs: list[dict], task: str, method: str, settings: Settings, phase: str = "final") -> list[dict]:
    """The runs (every seed) of `method` on `task` at `settings` in `phase` ("final" or the longer-budget "long")."""
    wanted = dataclasses.asdict(settings)
    return [r for r in runs if r["task"] == task and r["phase"] == phase and r["method"] == method
            and r["settings"] == wanted]


def best(scores: dict[Settings, float]) -> Settings:
    return max(scores, key=scores.__getitem__)  # a tie keeps the earlier trial


def settle(scores: dict[Settings, float], finals: Callable[[Settings], list[dict]]) -> list[Settings]:
    """The settings the family's finals tried, in order; the last is its choice, the others collapsed.
    `finals(settings)` gives the representative's final runs at those settings (the protocol runs them)."""
    tried = [best(scores)]
    while any(map(collapsed, finals(tried[-1]))):
        lower = {s: score for s, score in scores.items() if s.lr < tried[-1].lr}
        if not lower:  # nothing stabler left: the report shows the collapse
            break
        tried.append(best(lower))
    return tried


def chosen(runs: list[dict], task: str) -> dict[str, list[Settings]]:
    """Per tuned family, the settings its finals tried on `task` (from the stored runs); the last is its choice."""
    tried = {}
    for family, name in REPRESENTATIVE.items():
        if scores := trial_scores(runs, task, name):
            tried[family] = settle(scores, lambda settings, name=name: finals_at(runs, task, name, settings))
    return tried


def counted(runs: list[dict], task: str) -> list[dict]:
    """The final runs the figures use: each family's at its choice, not at settings it replaced."""
    choices = chosen(runs, task)

    def counts(run: dict) -> bool:
        tried = choices.get(BY_NAME[run["method"]].family)
        return tried is None or Settings(**run["settings"]) == tried[-1]

    return [r for r in runs if r["task"] == task and r["phase"] == "final" and counts(r)]
