"""The protocol's report from its runs: mean ± std per method, the targets' verdicts, the grids, the
Pareto plot. Until every run has finished it goes to `quality_partial.{json,md,png}` and says how far it
got; `quality.{json,md,png}` is written only by a complete protocol."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from benchmarks.quality import grid
from benchmarks.quality.choice import chosen, collapsed, counted, curve_of, finals_at, settled
from benchmarks.quality.grid import (
    BY_NAME,
    LM_SEARCH,
    LONG_EPOCHS,
    LONG_PATIENCE,
    MAJORITY,
    METHODS,
    REPRESENTATIVE,
    SEARCH,
    SEEDS,
    TASKS,
    Settings,
    checked,
)
from benchmarks.quality.store import RunStore
from benchmarks.report import markdown_table, write_report


def summarise(finals: list[dict], task: str) -> list[dict]:
    """Per method, mean ± std over seeds of `finals` (a task's counted finals, or its longer-budget runs)."""
    rows = []
    for method in [m.name for m in METHODS if any(r["method"] == m.name for r in finals)]:
        mine = [r for r in finals if r["method"] == method]
        acc = [100 * r["test_accuracy"] for r in mine]
        rows.append({"task": task, "method": method, "accuracy_mean": statistics.mean(acc),
                     "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                     "validation_mean": statistics.mean(100 * r["validation_accuracy"] for r in mine),
                     "params": mine[0]["params"], "params_with_head": mine[0]["params_with_head"],
                     "train_seconds": statistics.mean(r["train_seconds"] for r in mine), "seeds": len(mine),
                     "collapsed": sum(map(collapsed, mine)), "settings": mine[0]["settings"]})
    return rows


def pareto(rows: list[dict]) -> list[dict]:
    """The rows no other row beats with as few or fewer parameters."""
    front, best = [], float("-inf")
    for row in sorted(rows, key=lambda r: (r["params"], -r["accuracy_mean"])):
        if row["accuracy_mean"] > best:
            front.append(row)
            best = row["accuracy_mean"]
    return front


SMALL = 20_000  # the frontier target's bound on adapter parameters


def target_lines(rows: list[dict], task: str) -> list[str]:
    return headline_lines(rows, task) + frontier_lines(rows, task)


def headline_lines(rows: list[dict], task: str) -> list[str]:
    """DCFT k8 within 1 point of LoRA r1 with >= 5x fewer parameters, else the DCFT setting closest to it."""
    by_name = {r["method"]: r for r in rows}
    dcft, lora = by_name.get("DCFT k8"), by_name.get("LoRA r1")
    if not (dcft and lora):
        return [f"{task}: DCFT k8 and LoRA r1 are not both finished yet."]
    gap, fewer = dcft["accuracy_mean"] - lora["accuracy_mean"], lora["params"] / dcft["params"]
    verdict = undecided(dcft, lora) or ("meets" if gap >= -1 and fewer >= 5 else "misses")
    lines = [f"{task}: DCFT k8 {accuracy(dcft)} vs LoRA r1 {accuracy(lora)} ({gap:+.1f} points) with {fewer:.1f}x "
             f"fewer adapter parameters: {verdict} the target (within 1 point, >= 5x fewer)."]
    if verdict == "misses":
        lines.append(best_dcft_line(rows, lora))
    return lines


def best_dcft_line(rows: list[dict], lora: dict) -> str:
    """The DCFT setting closest to LoRA r1 among those with every seed finished (a partial mean could win
    on one lucky seed), and which settings are still running."""
    dcfts = [r for r in rows if BY_NAME[r["method"]].family == "dcft"]
    pending = [r["method"] for r in dcfts if undecided(r)]
    best = max((r for r in dcfts if r["method"] not in pending), key=lambda r: r["accuracy_mean"])
    line = (f"Best DCFT setting: {best['method']} {best['accuracy_mean']:.1f} with {best['params']:,} "
            f"parameters ({best['accuracy_mean'] - lora['accuracy_mean']:+.1f} vs LoRA r1)")
    if pending:
        line += f"; not yet judged: {', '.join(pending)}"
    return line + "."


def frontier_lines(rows: list[dict], task: str) -> list[str]:
    """DCFT on or above the LoRA frontier below 20k parameters: each LoRA point there against the best
    DCFT point with no more parameters."""
    dcfts = [r for r in rows if BY_NAME[r["method"]].family == "dcft"]
    loras = [r for r in rows if BY_NAME[r["method"]].family == "lora" and r["params"] < SMALL]
    if not loras:
        small = ", ".join(f"{r['method']} {accuracy(r)} ({r['params']:,})" for r in dcfts if r["params"] < SMALL)
        return [f"{task}: below 20k parameters LoRA has no finished point yet; DCFT there: {small}."] if small else []
    lines = []
    for lora in loras:
        if not (best := best_dcft_within(rows, lora["params"])):
            lines.append(f"{task}: {lora['method']} ({lora['params']:,} parameters) has no finished DCFT point "
                         "with as few parameters yet.")
            continue
        gap = best["accuracy_mean"] - lora["accuracy_mean"]
        verdict = undecided(best, lora) or ("meets" if gap >= 0 else "misses")
        lines.append(f"{task}: below 20k parameters, {best['method']} {accuracy(best)} ({best['params']:,} "
                     f"parameters) vs {lora['method']} {accuracy(lora)} ({lora['params']:,}): {gap:+.1f} points "
                     f"with no more parameters: {verdict} the target (DCFT on or above the LoRA frontier).")
    return lines


def relative_lines(rows: list[dict], task: str) -> list[str]:
    """DCFT against its nearest relative, PEFT's LoKr (a Kronecker-product adapter too): no target, but what
    a reader choosing between the two needs. The best DCFT point with no more parameters than LoKr's."""
    lokr = next((r for r in rows if BY_NAME[r["method"]].family == "lokr"), None)
    if not (lokr and (best := best_dcft_within(rows, lokr["params"]))):
        return []
    caveat = undecided(best, lokr)
    return [f"{task}: against DCFT's nearest relative, PEFT's {lokr['method']} {accuracy(lokr)} "
            f"({lokr['params']:,} parameters), the best DCFT point with no more parameters, {best['method']} "
            f"{accuracy(best)} ({best['params']:,}), is {best['accuracy_mean'] - lokr['accuracy_mean']:+.1f} points"
            + (f"; {caveat}." if caveat else ".")]


def best_dcft_within(rows: list[dict], params: int) -> dict | None:
    """The most accurate DCFT point with no more than `params` adapter parameters, if any."""
    rivals = [r for r in rows if BY_NAME[r["method"]].family == "dcft" and r["params"] <= params]
    return max(rivals, key=lambda r: r["accuracy_mean"], default=None)


def undecided(*rows: dict) -> str | None:
    """Why these rows cannot decide a target yet: a collapsed seed (it decides the mean, not the method's
    accuracy), or seeds still to run (a partial mean is no verdict)."""
    if fallen := [f"{r['method']} {r['collapsed']}" for r in rows if r["collapsed"]]:
        return f"cannot yet judge (runs collapsed: {', '.join(fallen)} of their seeds)"
    if short := [f"{r['method']} {r['seeds']}" for r in rows if r["seeds"] < len(SEEDS)]:
        return f"cannot yet judge (seeds finished: {', '.join(short)} of {len(SEEDS)})"
    return None


def accuracy(row: dict) -> str:
    return f"{row['accuracy_mean']:.1f} ± {row['accuracy_std']:.1f}"


def spread(values: list[float]) -> str:
    """Mean ± std; a single run has no spread to show."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def long_runs(runs: list[dict], task: str) -> list[dict]:
    """The longer-budget check's runs: each checked method at its family's choice."""
    choices = chosen(runs, task)
    return [r for name in checked(task) if (family := BY_NAME[name].family) in choices
            for r in finals_at(runs, task, name, choices[family][-1], phase="long")]


def long_lines(runs: list[dict], task: str) -> list[str]:
    """The longer-budget check beside the 3-epoch finals: does the headline gap hold with more training?"""
    finals, checks = counted(runs, task), long_runs(runs, task)
    parts = []
    for name in dict.fromkeys(r["method"] for r in checks):
        long = [r for r in checks if r["method"] == name]
        short = [100 * r["test_accuracy"] for r in finals if r["method"] == name]
        scores = [100 * r["test_accuracy"] for r in long]
        best_epochs = [curve.index(max(curve)) + 1 for curve in map(curve_of, long)]
        fallen = f", {sum(map(collapsed, long))} collapsed" if any(map(collapsed, long)) else ""
        parts.append(f"{name} {spread(scores)} over {len(long)} seed{'s' * (len(long) > 1)} (3 epochs: "
                     f"{spread(short) if short else 'not run yet'}; best epochs {best_epochs}{fallen})")
    if not parts:
        return []
    line = (f"{task}, longer budget (up to {LONG_EPOCHS:g} epochs, patience {LONG_PATIENCE}, at the 3-epoch "
            f"choice): {'; '.join(parts)}")
    return [". ".join([line, *long_gaps(summarise(checks, task), summarise(finals, task))]) + "."]


def long_gaps(checks: list[dict], finals: list[dict]) -> list[str]:
    """Each checked DCFT setting's gap to LoRA r1 at the longer budget and at 3 epochs (summarised rows of
    each), once the headline's rule allows (every seed finished, none collapsed) and both have 3-epoch finals."""
    long, short = {r["method"]: r for r in checks}, {r["method"]: r for r in finals}
    if "LoRA r1" not in long or "LoRA r1" not in short:
        return []

    def gap(rows: dict[str, dict], name: str) -> float:
        return rows[name]["accuracy_mean"] - rows["LoRA r1"]["accuracy_mean"]

    return [f"{name} vs LoRA r1: {gap(long, name):+.1f} points (3 epochs: {gap(short, name):+.1f})"
            for name in long if BY_NAME[name].family == "dcft" and name in short
            and undecided(long[name], long["LoRA r1"]) is None]


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
        if best["method"] == "DCFT k8":
            others = ", ".join(f"{r['method']} {r['test_perplexity']:.1f} ({r['params']:,} parameters)"
                               for r in dcfts if r is not best)
            lines.append(f"LM: no other DCFT setting tried does better than DCFT k8: {others}.")
        else:
            excess = best["test_perplexity"] / lora["test_perplexity"] - 1
            lines.append(f"LM: the best DCFT setting, {best['method']} ({best['params']:,} parameters, "
                         f"{lora['params'] / best['params']:.1f}x fewer than LoRA r1), reaches perplexity "
                         f"{best['test_perplexity']:.1f}, {100 * excess:+.1f}% of LoRA r1's.")
    return rows, lines


def final_runs(runs: list[dict], task: str) -> list[dict]:
    """A task's counted final runs (classification), or all of them (the LM, which has no choice rule)."""
    if task in TASKS:
        return counted(runs, task)
    return [r for r in runs if r["task"] == task and r["phase"] == "final"]


def edge_lines(runs: list[dict]) -> list[str]:
    """Families whose chosen learning rate sits at the edge of what was tried (a wider grid might do better):
    the edge of the grid where there is no step beyond it, else the step beyond."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in runs if r["phase"] == "final"):
        searches, finals = LM_SEARCH if task == "lm" else SEARCH, final_runs(runs, task)
        for family, method in REPRESENTATIVE.items():
            row = next((r for r in finals if r["method"] == method), None)
            if family not in searches or row is None or not row["settings"]:
                continue
            search, lr = searches[family], row["settings"]["lr"]
            grid = search.stages[0][1]
            if search.lr_beyond and lr in search.lr_beyond:
                lines.append(f"{task}: {method}'s chosen learning rate {lr:g} lies one step beyond its grid "
                             f"{list(grid)}, the step the protocol adds at an edge; a wider grid might do better.")
            elif not search.lr_beyond and lr in (min(grid), max(grid)):
                lines.append(f"{task}: {method}'s chosen learning rate {lr:g} is at the edge of its grid {list(grid)}.")
    return lines


def convergence_lines(runs: list[dict]) -> list[str]:
    """Counted final runs whose best validation epoch was their last: more epochs might have helped them.
    (Runs from before the curve was recorded are left out.)"""
    curves: dict[str, list[bool]] = {}
    for r in (r for task in TASKS for r in counted(runs, task)):
        if curve := r.get("validation_by_epoch"):
            curves.setdefault(f"{r['task']} {r['method']}", []).append(curve.index(max(curve)) == len(curve) - 1)
    if not curves:
        return []
    shown = "; ".join(f"{name} {sum(last)} of {len(last)}" for name, last in curves.items())
    return [f"Final runs whose best validation epoch was their last (more epochs might have helped): {shown}."]


def collapse_lines(runs: list[dict]) -> list[str]:
    """Final runs that fell to the majority-class rate on validation at some epoch: their settings sit at the
    edge of divergence for that seed (the best epoch is kept, so a late collapse still scores its best)."""
    lines = []
    for task in dict.fromkeys(r["task"] for r in runs if r["task"] in MAJORITY):
        fallen: dict[tuple[str, Settings], list[str]] = {}
        for r in runs:
            if r["task"] == task and r["phase"] == "final" and collapsed(r):
                key = (r["method"], Settings(**r["settings"]))
                fallen.setdefault(key, []).append(f"seed {r['seed']} {curve_of(r)}")
        for (method, settings), seeds in fallen.items():
            tried = settled(runs, task, method) or [settings]
            outcome = (f"The protocol replaced these settings with the family's best trial at a lower learning rate "
                       f"(lr {tried[-1].lr:g}), which the figures use." if settings in tried[:-1] else
                       "Its mean over seeds measures its instability at these settings as much as its accuracy.")
            lines.append(f"Collapsed to the majority class during training, {task} {method} (lr {settings.lr:g}): "
                         f"{', '.join(seeds)}. {outcome}")
    return lines


def grid_table(runs: list[dict], task: str) -> str:
    """Each family's trials in the order they ran, the families apart, with the choice marked."""
    tried = chosen(runs, task)
    order = [m.name for m in METHODS]
    tune = [r for r in runs if r["task"] == task and r["phase"] == "tune"]
    rows = [{"method": r["method"], **r["settings"], "validation": 100 * r["validation_accuracy"],
             "train_seconds": r["train_seconds"],
             "choice": part_in_choice(Settings(**r["settings"]), tried[BY_NAME[r["method"]].family])}
            for r in sorted(tune, key=lambda r: order.index(r["method"]))]
    columns = ["method", *Settings.__dataclass_fields__, "validation", "train_seconds", "choice"]
    return markdown_table(rows, columns) if rows else "(no tuning run finished yet)"


def part_in_choice(settings: Settings, tried: list[Settings]) -> str:
    """A trial's part in its family's choice (choice.py)."""
    if settings == tried[-1]:
        return "chosen" if len(tried) == 1 else "chosen (replacement)"
    return "best, collapsed in finals: replaced" if settings in tried else ""


def point_label(row: dict, off_scale: bool = False) -> str:
    """A plotted method's name, and what keeps its mean from being a plain accuracy: seeds still to run, or
    seeds that collapsed to the majority class (their mean measures instability too)."""
    caveats = [f"{row['seeds']} of {len(SEEDS)} seeds"] * (row["seeds"] < len(SEEDS))
    caveats += [f"{row['collapsed']} collapsed"] * (row["collapsed"] > 0)
    caveats += [f"mean {row['accuracy_mean']:.1f}"] * off_scale
    return f"{row['method']} ({', '.join(caveats)})" if caveats else row["method"]


def draw_point(ax, row: dict, floor: float) -> bool:
    """A method's mean ± std at its parameter count, or a down-pointing marker on the axis floor below it,
    with its label; returns whether it went on the floor."""
    x, color = row["params"], FAMILY_COLOR.get(BY_NAME[row["method"]].family, "C7")
    off_scale = row["accuracy_mean"] < floor
    if off_scale:
        ax.plot(x, floor, "v", color=color)
    else:
        ax.errorbar(x, row["accuracy_mean"], yerr=row["accuracy_std"], fmt="o", color=color, capsize=3)
    ax.annotate(point_label(row, off_scale), (x, max(row["accuracy_mean"], floor)), fontsize=7,
                xytext=(-3, 6) if off_scale else (4, 3), rotation=90 * off_scale, textcoords="offset points")
    return off_scale


def draw_baseline(ax, row: dict, floor: float) -> None:
    """Head only trains no adapter parameter, so it has no place on the log x axis (at 1 it would stretch the
    axis over 4 empty decades): a dotted line at its mean, named in the legend, which says when it is below."""
    text = f"{row['method']} (no adapter) {row['accuracy_mean']:.1f} ± {row['accuracy_std']:.1f}"
    if row["accuracy_mean"] >= floor:
        ax.axhline(row["accuracy_mean"], color="C7", ls=":", label=text)
    else:
        ax.plot([], [], ls=":", color="C7", label=f"{text}, below the axis")


def separate_labels(ax) -> None:
    """Lifts each point label clear of the labels below it: settings with close parameter counts and
    accuracies (DCFT k4 and k12, say) would otherwise print their names over each other."""
    renderer, pixels_to_points = ax.figure.canvas.get_renderer(), 72 / ax.figure.dpi
    placed = []
    for label in sorted(ax.texts, key=lambda text: (text.xy[1], text.xy[0])):
        box = label.get_window_extent(renderer)
        while (hit := next((b for b in placed if b.overlaps(box)), None)) is not None:
            label.xyann = (label.xyann[0], label.xyann[1] + (hit.y1 - box.y0 + 1) * pixels_to_points)
            box = label.get_window_extent(renderer)
        placed.append(box)


FAMILY_COLOR = {"dcft": "C0", "lora": "C1", "lokr": "C2"}  # head only and full fine-tuning: grey


def plot(rows_by_task: dict[str, list[dict]], checks_by_task: dict[str, list[dict]], path: Path) -> None:
    """Accuracy against parameters per task, with its Pareto frontier; the longer-budget check as open markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t, rows in rows_by_task.items() if rows]
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(6.5 * max(1, len(tasks)), 5), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        plot_task(ax, rows_by_task[task], checks_by_task.get(task, []))
        ax.set_title(f"{task} ({TASKS[task]}), MiniLM-L6")
    fig.tight_layout()
    for ax in axes[0]:
        separate_labels(ax)  # after the layout, which sets the axes' final size
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_task(ax, rows: list[dict], checks: list[dict]) -> None:
    """One task's panel: every method with adapter parameters as a point, head only as a line."""
    points = [r for r in rows if r["params"]]
    # a mean pulled down by a collapsed seed would squash every other point into a line: the axis
    # spans the uncollapsed points, and a point below it sits on its floor, labelled with its mean
    stable = [r for r in points + checks if not r["collapsed"]]
    floor = min((r["accuracy_mean"] - r["accuracy_std"] - 1 for r in stable), default=float("-inf"))
    if any([draw_point(ax, row, floor) for row in points]):  # a list: every point is drawn
        ax.set_ylim(bottom=floor - 0.5)
        ax.plot([], [], "v", color="k", label="mean below the axis")
    for row in rows:
        if not row["params"]:
            draw_baseline(ax, row, floor)
    for row in checks:  # beside its 3-epoch point, open and unlabelled
        color = FAMILY_COLOR[BY_NAME[row["method"]].family]
        ax.errorbar(row["params"], row["accuracy_mean"], yerr=row["accuracy_std"], fmt="o", mfc="none",
                    color=color, capsize=3)
    if checks:  # one legend entry in a neutral colour
        ax.plot([], [], "o", mfc="none", color="k", label=f"longer-budget check (up to {LONG_EPOCHS:g} epochs)")
    front = pareto(points)
    ax.step([r["params"] for r in front], [r["accuracy_mean"] for r in front], where="post",
            color="k", alpha=0.4, label="Pareto frontier")
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters (head excluded)")
    ax.set_ylabel("test accuracy, % (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    # below the axes, where it covers no point or label
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)


def notes(args: argparse.Namespace, runs: list[dict], rows_by_task: dict[str, list[dict]], lm_target: list[str],
          complete: bool) -> list[str]:
    """The report's text before its tables: status, protocol, the targets' verdicts, the caveats."""
    status = "Complete protocol." if complete else (
        "SMOKE run: a few examples and one trial per family; it checks the machinery, not quality."
        if args.smoke else (
        f"PARTIAL: {len(runs)} runs finished so far; the protocol is still running (or was stopped). "
        "These are not the final figures."))
    return [
        status,
        "`train_seconds` is wall-clock on the machine of its row. On a shared CPU it also counts the other "
        "work running there (a row whose machine names a load shows the 1-minute load average at its end): "
        "compare times only roughly.",
        grid.__doc__.split("\n\n", 1)[1].strip(),
        *[line for task in args.tasks for line in target_lines(rows_by_task[task], task)],
        *[line for task in args.tasks for line in relative_lines(rows_by_task[task], task)],
        *[line for task in args.tasks for line in long_lines(runs, task)],
        *lm_target,
        *edge_lines(runs),
        *convergence_lines(runs),
        *collapse_lines(runs),
    ]


def sections(args: argparse.Namespace, runs: list[dict], lm_rows: list[dict]) -> list[str]:
    """The detail: each task's tuning grid, the causal LM, every final run per seed."""
    parts = [f"## Tuning grid: {task} (validation accuracy, %; seed 0)\n\n{grid_table(runs, task)}"
             for task in args.tasks]
    if lm_rows:
        lm_tune = [{"method": r["method"], "lr": r["settings"]["lr"], "validation_perplexity": r[
            "validation_perplexity"], "train_seconds": r["train_seconds"]} for r in runs if r["task"] == "lm" and r[
            "phase"] == "tune"]
        parts.append("## Causal LM (SmolLM2-135M, held-out reviews)\n\n" + markdown_table(lm_rows, list(lm_rows[0]))
                     + "\n\nLearning-rate trials (validation only):\n\n"
                     + (markdown_table(lm_tune, list(lm_tune[0])) if lm_tune else "(none)"))
    kept = {r["key"] for task in args.tasks for r in counted(runs, task)}
    finals = [{**{k: r.get(k) for k in ("task", "method", "phase", "seed", "validation_accuracy", "test_accuracy",
               "test_f1", "params", "train_seconds", "epochs_run", "validation_by_epoch", "machine")},
               "lr": f"{r['settings']['lr']:g}", "counted": r["key"] in kept} for r in runs
              if r["phase"] in ("final", "long") and r["task"] != "lm"]
    parts.append("## Final runs (and the longer-budget check), per seed\n\n"
                 + (markdown_table(finals, list(finals[0])) if finals else "(none)"))
    return parts


def write(args: argparse.Namespace, store: RunStore, complete: bool) -> Path:
    runs = store.runs
    name = "quality_smoke" if args.smoke else "quality" if complete else "quality_partial"
    rows_by_task = {task: summarise(counted(runs, task), task) for task in args.tasks}
    lm_rows, lm_target = lm_lines(runs)
    rows = [row for task in args.tasks for row in rows_by_task[task]]
    columns = ["task", "method", "accuracy_mean", "accuracy_std", "validation_mean", "params", "params_with_head",
               "train_seconds", "seeds", "collapsed"]
    text = "\n\n".join(notes(args, runs, rows_by_task, lm_target, complete)) + (
        "\n\nMean ± std of test accuracy over seeds (the table below), then the detail:\n\n")
    text += "\n\n".join(sections(args, runs, lm_rows))
    path = write_report(name, "DCFT quality protocol (MiniLM classification, SmolLM2 perplexity)", rows, columns,
                        text, out_dir=args.out)
    checks = {task: summarise(long_runs(runs, task), task) for task in args.tasks}
    payload = json.loads((args.out / f"{name}.json").read_text())
    payload |= {"complete": complete, "runs": runs, "causal_lm": lm_rows,
                "longer_budget": [row for task in args.tasks for row in checks[task]]}
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    plot(rows_by_task, checks, args.out / f"{name}.png")
    return path
