"""Which settings a family's final runs use. Tuning picks the best trial on seed 0's validation; a pick
whose final runs collapse (diverge to the majority class) on any seed trains on some seeds only, which
is no usable choice. So the family's best trial at a lower learning rate replaces it (divergence is a
learning rate too high for that seed), and so on down while trials remain. Every family gets the same
rule, and so does every other member of a family: it starts at its family's choice and, where its own
finals collapse, steps down the family's grid alone. Pure functions of the runs: the protocol asks them
what to run next, the report which finals count.
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
    """The settings a method's finals tried, in order: the best trial, then while its finals collapse the
    best at a lower learning rate; the last counts. `finals(settings)` gives the method's final runs at
    those settings (the protocol runs them, the report looks them up)."""
    tried = [best(scores)]
    while any(map(collapsed, finals(tried[-1]))):
        lower = {s: score for s, score in scores.items() if s.lr < tried[-1].lr}
        if not lower:  # nothing stabler left: the report shows the collapse
            break
        tried.append(best(lower))
    return tried


def settled(runs: list[dict], task: str, method: str) -> list[Settings]:
    """The settings `method`'s finals tried on `task` (from the stored runs), in order: the last is the one
    that counts, the others collapsed; empty before its family's grid has run. The representative
    settles its family's choice from the grid; any other member starts at that choice and, where its own
    finals collapse, steps down from there (a learning rate no higher than the family's)."""
    representative = REPRESENTATIVE[BY_NAME[method].family]
    if not (scores := trial_scores(runs, task, representative)):
        return []
    tried = settle(scores, lambda settings: finals_at(runs, task, representative, settings))
    if method == representative:
        return tried
    return settle(at_or_below(scores, tried[-1]), lambda settings: finals_at(runs, task, method, settings))


def at_or_below(scores: dict[Settings, float], choice: Settings) -> dict[Settings, float]:
    """The trials a member starts from: its family's choice is the best of them, and none has a higher
    learning rate (the family's choice already stepped past those, or they scored lower)."""
    return {settings: score for settings, score in scores.items() if settings.lr <= choice.lr}


def chosen(runs: list[dict], task: str) -> dict[str, list[Settings]]:
    """Per tuned family, the settings its representative's finals tried on `task`; the last is its choice."""
    return {family: tried for family, name in REPRESENTATIVE.items() if (tried := settled(runs, task, name))}


def counted(runs: list[dict], task: str) -> list[dict]:
    """The final runs the figures use: each method's at the settings it settled on, not at settings it replaced."""
    finals = [r for r in runs if r["task"] == task and r["phase"] == "final"]
    last = {name: tried[-1] for name in {r["method"] for r in finals} if (tried := settled(runs, task, name))}
    return [r for r in finals if r["method"] not in last or Settings(**r["settings"]) == last[r["method"]]]
