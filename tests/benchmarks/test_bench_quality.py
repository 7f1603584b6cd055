"""The quality protocol: its second task's data, its search and frontier rules, and a smoke run (tiny LM)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from adapters.store.atomic import write_atomic
from benchmarks.fixtures import tiny_llama_dir
from benchmarks.quality import main, protocol, workers
from benchmarks.quality.choice import best, counted, settle
from benchmarks.quality.cli import parse_args
from benchmarks.quality.grid import REPRESENTATIVE, SEARCH, Settings
from benchmarks.quality.report import (
    collapse_lines,
    convergence_lines,
    frontier_lines,
    grid_table,
    lm_lines,
    long_lines,
    pareto,
    plot,
    plot_task,
    point_label,
    relative_lines,
    separate_labels,
    summarise,
    target_lines,
    write,
)
from benchmarks.quality.store import RunStore
from training.data import DataConfig, load_dataset, plot_sentences


def test_plot_sentences_keep_review_sized_sentences():
    summary = "Tom meets Ann. She is a lawyer in a small town who hates lawyers! Then a storm comes to the town."
    assert plot_sentences(summary) == ["She is a lawyer in a small town who hates lawyers!",
                                       "Then a storm comes to the town."]


@pytest.mark.real
def test_subjectivity_splits_are_balanced_and_disjoint():
    splits = load_dataset(DataConfig(source="rotten-tomatoes-subjectivity"))
    assert splits.labels == ("review", "plot")
    assert (len(splits.train), len(splits.validation), len(splits.test)) == (8512, 922, 1098)
    for part in (splits.train, splits.validation, splits.test):
        assert 2 * sum(e.label for e in part) == len(part)
    train = {e.text for e in splits.train}
    assert not any(e.text in train for e in (*splits.validation, *splits.test))


def test_every_adapter_family_gets_the_same_tuning_budget():
    assert {SEARCH[f].trials() for f in ("dcft", "lora", "lokr")} == {7}
    assert {SEARCH[f].trials() for f in ("head", "full")} == {3}


def test_pareto_keeps_rows_no_cheaper_row_beats():
    rows = [{"params": p, "accuracy_mean": a} for p, a in ((0, 60), (10, 70), (20, 65), (30, 80), (40, 80))]
    assert [r["params"] for r in pareto(rows)] == [0, 10, 30]


@pytest.mark.real
def test_smoke_run_writes_a_labelled_report(tmp_path):
    lm = tiny_llama_dir(tmp_path / "llama")
    main(["--smoke", "--out", str(tmp_path / "out"), "--lm-model", str(lm)])
    report = json.loads((tmp_path / "out/quality_smoke.json").read_text())
    assert not report["complete"]
    assert {r["method"] for r in report["rows"]} == {"head only", "DCFT k8", "LoRA r1"}
    tune = [r for r in report["runs"] if r["phase"] == "tune"]
    assert tune and all("test_accuracy" not in r for r in tune)  # tuning never reads the test split
    assert all(len(r["validation_by_epoch"]) == 1 for r in report["runs"] if r["task"] != "lm")  # 1 epoch
    assert {r["method"] for r in report["causal_lm"]} == {"bare", "DCFT k8", "LoRA r1"}
    assert (tmp_path / "out/quality_smoke.png").stat().st_size > 0
    assert "SMOKE" in (tmp_path / "out/quality_smoke.md").read_text()


@pytest.mark.real
def test_workers_run_the_grid_in_processes_and_the_sequential_pass_finds_it_done(tmp_path, capsys):
    stale = tmp_path / "quality_checkpoints/0123abcd/checkpoints/checkpoint-7"  # an earlier protocol's unfinished run
    stale.mkdir(parents=True)
    main(["--smoke", "--no-lm", "--workers", "2", "--only", "head only", "--out", str(tmp_path)])
    assert not stale.parent.parent.exists()  # without --resume nothing continues from it
    printed = capsys.readouterr().out
    assert "worker tune sentiment head only seeds [0]: 1 new runs" in printed and printed.count("new runs") == 2
    assert "sentiment    tune" not in printed  # a run the main process trained itself would print this line
    runs = json.loads((tmp_path / "quality_smoke_runs.json").read_text())["runs"]
    assert sorted(r["phase"] for r in runs) == ["final", "tune"] and {r["method"] for r in runs} == {"head only"}


def test_a_best_learning_rate_at_the_grid_edge_earns_one_step_beyond():
    lora = SEARCH["lora"]
    assert (lora.beyond(3e-3), lora.beyond(1e-2), lora.beyond(3e-2)) == (1e-3, None, 1e-1)


def test_tuning_tries_the_step_beyond_an_edge_before_the_next_knob(monkeypatch, tmp_path):
    def validation_by_lr(task, method, settings, *rest):  # scored from the settings alone: the search is under test
        return {"validation_accuracy": {1e-3: 0.9, 3e-3: 0.8}.get(settings.lr, 0.5) + 0.01 * settings.scale,
                "train_seconds": 0.0}

    monkeypatch.setattr(protocol, "run_classifier", validation_by_lr)
    args = parse_args(["--out", str(tmp_path)])
    sequence = protocol.Protocol(args, RunStore(tmp_path / "runs.json", resume=False), tmp_path)
    sequence.splits = lambda task: None  # no data needed: nothing trains
    chosen = best(sequence.tune("sentiment", "lora"))
    tried = [json.loads(r["key"])["settings"] for r in sequence.store.runs]
    assert [t["lr"] for t in tried[:4]] == [3e-3, 1e-2, 3e-2, 1e-3]  # the step beyond, right after the grid
    assert chosen.lr == 1e-3 and chosen.scale == 4.0 and len(tried) == SEARCH["lora"].trials() + 1


def test_a_missed_lm_target_names_the_dcft_setting_closest_to_lora():
    def final(method, perplexity, params):
        return {"task": "lm", "phase": "final", "method": method, "validation_perplexity": perplexity,
                "test_perplexity": perplexity, "params": params, "train_seconds": 1.0, "settings": {"lr": 0.03},
                "machine": "cpu"}

    runs = [final("DCFT k8", 75.0, 50_000), final("LoRA r1", 69.0, 300_000), final("DCFT k8 s2", 71.0, 100_000)]
    _, lines = lm_lines(runs)
    assert lines[0].startswith("LM: DCFT k8 perplexity is +8.7% of LoRA r1's: misses")
    assert "DCFT k8 s2 (100,000 parameters, 3.0x fewer than LoRA r1), reaches perplexity 71.0, +2.9%" in lines[1]
    runs[2] = final("DCFT k8 s2", 78.0, 100_000)
    assert lm_lines(runs)[1][1] == ("LM: no other DCFT setting tried does better than DCFT k8: "
                                    "DCFT k8 s2 78.0 (100,000 parameters).")


def test_a_workers_finished_runs_are_merged_before_it_ends(monkeypatch, tmp_path):
    """A worker stopped part way (a time limit) keeps the runs it finished: the parent merges them as they land."""
    import threading

    merged = threading.Event()

    def worker(args, store, work, stage, task, names, seeds):  # stands in for the subprocess
        runs = workers.worker_runs(work, store, stage, task, names, seeds)
        runs.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(runs, json.dumps({"runs": [{"key": f"{task}-{names[0]}"}]}).encode())
        assert merged.wait(10), "the parent never merged the finished run while the worker ran"

    def save():  # the store's save after a merge
        original_save()
        merged.set()

    monkeypatch.setattr(workers, "_worker", worker)
    monkeypatch.setattr(workers, "MERGE_EVERY_S", 0.05)
    args = parse_args(["--out", str(tmp_path), "--workers", "2", "--only", "head only", "--stages", "tune",
                               "--tasks", "sentiment"])
    store = RunStore(tmp_path / "runs.json", resume=False)
    store.save()
    original_save, store.save = store.save, save
    workers.run_workers(args, store, tmp_path / "work")
    assert [r["key"] for r in store.runs] == ["sentiment-head only"]


def test_the_report_counts_final_runs_still_improving_at_their_last_epoch():
    runs = [{"task": "sentiment", "phase": "final", "method": "DCFT k8", "validation_by_epoch": curve}
            for curve in ([70.0, 75.0, 78.0], [70.0, 79.0, 78.0], None)]
    assert convergence_lines(runs) == ["Final runs whose best validation epoch was their last (more epochs might "
                                       "have helped): sentiment DCFT k8 1 of 2."]


def test_the_frontier_target_weighs_each_small_lora_point_against_dcft_with_no_more_parameters():
    def row(method, mean, params):
        return {"method": method, "accuracy_mean": mean, "accuracy_std": 0.5, "params": params, "collapsed": 0,
                "seeds": 3}

    rows = [row("DCFT k8", 80.0, 7_488), row("DCFT k8 s4", 83.0, 12_600), row("LoRA r1 qv", 81.0, 9_216),
            row("LoRA r1", 82.0, 41_472)]
    assert frontier_lines(rows, "sentiment") == [
        "sentiment: below 20k parameters, DCFT k8 80.0 ± 0.5 (7,488 parameters) vs LoRA r1 qv 81.0 ± 0.5 (9,216): "
        "-1.0 points with no more parameters: misses the target (DCFT on or above the LoRA frontier)."]
    assert "no finished point yet; DCFT there: DCFT k8 80.0 ± 0.5 (7,488)" in frontier_lines(rows[:2], "x")[0]


def test_the_report_names_final_runs_that_collapsed_to_the_majority_class():
    def final(seed, curve):
        return {"task": "subjectivity", "phase": "final", "method": "LoRA r1", "seed": seed, "settings": {"lr": 0.01},
                "validation_by_epoch": curve, "validation_accuracy": max(curve) / 100}

    runs = [final(0, [93.2, 94.8]), final(1, [50.0, 50.0]), final(2, [92.0, 50.0])]
    assert collapse_lines(runs) == ["Collapsed to the majority class during training, subjectivity LoRA r1 (lr 0.01): "
                                    "seed 1 [50.0, 50.0], seed 2 [92.0, 50.0]. Its mean over seeds measures its "
                                    "instability at these settings as much as its accuracy."]


def test_a_collapsed_seed_leaves_the_headline_target_undecided():
    results = (("DCFT k8", 95.4, 0.1, 7_488, 0), ("LoRA r1", 79.2, 25.3, 41_472, 1))
    rows = [{"method": name, "accuracy_mean": mean, "accuracy_std": std, "params": params, "collapsed": fallen,
             "seeds": 3} for name, mean, std, params, fallen in results]
    assert "cannot yet judge (runs collapsed: LoRA r1 1 of their seeds) the target" in target_lines(
        rows, "subjectivity")[0]
    rows[1] |= {"accuracy_mean": 96.1, "accuracy_std": 0.0, "collapsed": 0, "seeds": 1}  # one seed in: no verdict
    assert "cannot yet judge (seeds finished: LoRA r1 1 of 3) the target" in target_lines(rows, "subjectivity")[0]


def test_a_missed_headline_names_the_best_dcft_setting_with_every_seed_finished():
    results = (("DCFT k8", 79.5, 7_488, 3), ("DCFT k4", 79.8, 10_944, 3), ("DCFT k12", 81.0, 6_000, 1),
               ("LoRA r1", 82.1, 41_472, 3))
    rows = [{"method": name, "accuracy_mean": mean, "accuracy_std": 0.5, "params": params, "collapsed": 0,
             "seeds": seeds} for name, mean, params, seeds in results]
    assert target_lines(rows, "sentiment")[1] == (  # DCFT k12's one seed is no mean to name yet
        "Best DCFT setting: DCFT k4 79.8 with 10,944 parameters (-2.3 vs LoRA r1); not yet judged: DCFT k12.")


def test_dcft_is_set_against_lokr_with_no_more_parameters_than_lokrs():
    def row(method, mean, params, seeds=3):
        return {"method": method, "accuracy_mean": mean, "accuracy_std": 0.4, "params": params, "collapsed": 0,
                "seeds": seeds}

    rows = [row("DCFT k8", 79.5, 7_488), row("DCFT k8 s4", 80.4, 12_600), row("DCFT k2", 82.0, 20_880),
            row("LoKr r1", 81.1, 14_304), row("LoRA r1", 82.1, 41_472)]
    assert relative_lines(rows, "sentiment") == [  # DCFT k2 beats LoKr, but with more parameters
        "sentiment: against DCFT's nearest relative, PEFT's LoKr r1 81.1 ± 0.4 (14,304 parameters), the best DCFT "
        "point with no more parameters, DCFT k8 s4 80.4 ± 0.4 (12,600), is -0.7 points."]
    assert relative_lines(rows[:2] + [row("LoKr r1", 81.1, 14_304, seeds=1)], "sentiment")[0].endswith(
        "; cannot yet judge (seeds finished: LoKr r1 1 of 3).")
    assert relative_lines(rows[:3], "sentiment") == []


def test_the_grid_table_prints_full_fine_tunings_small_learning_rates():
    runs = [{"key": str(lr), "task": "sentiment", "phase": "tune", "method": "full fine-tuning", "seed": 0,
             "settings": dataclasses.asdict(Settings(lr)), "validation_accuracy": score, "train_seconds": 969.5}
            for lr, score in ((2e-5, 0.815), (5e-5, 0.834), (1e-4, 0.831))]
    rows = grid_table(runs, "sentiment").splitlines()[2:]
    assert [row.split(" | ")[1] for row in rows] == ["2e-05", "5e-05", "0.0001"]
    assert rows[1].endswith("| 83.400 | 969.500 | chosen |")


def test_a_plotted_point_names_its_missing_and_collapsed_seeds(tmp_path):
    def row(method, mean, std, seeds=3, collapsed=0):
        return {"method": method, "accuracy_mean": mean, "accuracy_std": std, "params": 41_472, "seeds": seeds,
                "collapsed": collapsed}

    fallen = row("LoRA r8", 57.8, 0.0, seeds=1, collapsed=1)
    assert point_label(row("LoRA r1", 82.1, 0.2)) == "LoRA r1"
    assert point_label(fallen, off_scale=True) == "LoRA r8 (1 of 3 seeds, 1 collapsed, mean 57.8)"
    plot({"sentiment": [row("LoRA r1", 82.1, 0.2), fallen]}, {}, tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 0


def test_head_only_is_a_line_at_its_mean_not_a_point_on_the_parameter_axis():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    head = {"method": "head only", "accuracy_mean": 66.9, "accuracy_std": 1.5, "params": 0, "seeds": 3,
            "collapsed": 0}
    fig, (above, below) = plt.subplots(1, 2)
    plot_task(above, [head], [])
    plot_task(below, [head, {**head, "method": "DCFT k8", "accuracy_mean": 79.5, "params": 7_488}], [])
    plt.close(fig)
    assert [list(line.get_ydata()) for line in above.lines] == [[66.9, 66.9], []]  # the frontier has no step
    assert not above.texts  # no point, so no point label
    assert [text.get_text() for text in below.texts] == ["DCFT k8"]
    assert "head only (no adapter) 66.9 ± 1.5, below the axis" in below.get_legend_handles_labels()[1]


def test_point_labels_at_one_spot_are_lifted_apart():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.set_xscale("log")
    for name, x, y in (("DCFT k12", 8_640, 79.8), ("DCFT k4", 9_000, 79.85), ("DCFT k8", 7_488, 79.7)):
        ax.annotate(name, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
    ax.set_xlim(5e3, 5e4), ax.set_ylim(75, 83)
    separate_labels(ax)
    renderer = fig.canvas.get_renderer()
    boxes = [text.get_window_extent(renderer) for text in ax.texts]
    plt.close(fig)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])
    assert boxes[2].y0 < boxes[0].y0  # the lowest point's label stays where it was, the others move up


def _final(task, method, seed, lr, curve):
    return {"key": f"{task}-{method}-{seed}-{lr}", "task": task, "phase": "final", "method": method, "seed": seed,
            "settings": dataclasses.asdict(Settings(lr)), "validation_by_epoch": curve,
            "validation_accuracy": max(curve) / 100}


def test_a_choice_that_collapses_on_a_seed_gives_way_to_the_best_trial_at_a_lower_learning_rate():
    scores = {Settings(3e-3): 0.946, Settings(1e-2): 0.947, Settings(3e-2): 0.5, Settings(1e-2, scale=4.0): 0.5}
    stable, unstable = [[93.0, 94.7]] * 3, [[93.0, 94.8], [50.0, 50.0], [92.0, 50.0]]

    def finals(curves_by_lr):
        return lambda settings: [_final("subjectivity", "LoRA r1", seed, settings.lr, curve)
                                 for seed, curve in enumerate(curves_by_lr.get(settings.lr, []))]

    assert settle(scores, finals({1e-2: stable})) == [Settings(1e-2)]
    assert settle(scores, finals({1e-2: unstable, 3e-3: stable})) == [Settings(1e-2), Settings(3e-3)]
    assert settle(scores, finals({1e-2: unstable, 3e-3: unstable})) == [Settings(1e-2), Settings(3e-3)]  # none lower


def _lr_01_wins_and_collapses_on_seed_1(*methods: str):
    """Stands in for one run: lr 0.01 wins the grid, and the finals of `methods` collapse there on seed 1."""

    def run(task, method, settings, seed, final, *rest):
        top = {3e-3: 94.0, 1e-2: 94.5}.get(settings.lr, 50.0)
        fallen = final and seed == 1 and settings.lr == 1e-2 and method.name in methods
        curve = [50.0, 50.0] if fallen else [90.0, top]
        return {"validation_accuracy": max(curve) / 100, "validation_by_epoch": curve, "test_accuracy": 0.9,
                "train_seconds": 0.0, "params": 1, "params_with_head": 2}

    return run


def _lora_members_on_subjectivity(monkeypatch, tmp_path, *collapsing: str) -> list[dict]:
    """The stored runs after LoRA r1 and r2's members stage, with `collapsing` falling at lr 0.01 on seed 1."""
    monkeypatch.setattr(protocol, "run_classifier", _lr_01_wins_and_collapses_on_seed_1(*collapsing))
    args = parse_args(["--out", str(tmp_path), "--tasks", "subjectivity", "--only", "LoRA r1", "LoRA r2"])
    sequence = protocol.Protocol(args, RunStore(tmp_path / "runs.json", resume=False), tmp_path)
    sequence.splits = lambda task: None
    sequence.members("subjectivity", "lora")
    return sequence.store.runs


def test_the_protocol_runs_the_replacement_finals_and_gives_every_member_the_stable_choice(monkeypatch, tmp_path):
    runs = _lora_members_on_subjectivity(monkeypatch, tmp_path, "LoRA r1")
    finals = [(r["method"], r["seed"], r["settings"]["lr"]) for r in runs if r["phase"] == "final"]
    assert finals == [("LoRA r1", s, 1e-2) for s in (0, 1, 2)] + [("LoRA r1", s, 3e-3) for s in (0, 1, 2)] + [
        ("LoRA r2", s, 3e-3) for s in (0, 1, 2)]
    rows = {r["method"]: r for r in summarise(counted(runs, "subjectivity"), "subjectivity")}
    assert rows["LoRA r1"]["settings"]["lr"] == 3e-3 and rows["LoRA r1"]["seeds"] == 3  # the replaced runs not counted
    assert "replaced these settings with the family's best trial at a lower learning rate (lr 0.003)" in (
        collapse_lines(runs)[0])
    marks = [line.rsplit("|", 2)[1].strip() for line in grid_table(runs, "subjectivity").splitlines()]
    assert marks.count("chosen (replacement)") == 1 and marks.count("best, collapsed in finals: replaced") == 1


def test_a_member_whose_own_finals_collapse_steps_down_the_grid_alone(monkeypatch, tmp_path):
    runs = _lora_members_on_subjectivity(monkeypatch, tmp_path, "LoRA r2")
    finals = [(r["method"], r["seed"], r["settings"]["lr"]) for r in runs if r["phase"] == "final"]
    assert finals == [("LoRA r1", s, 1e-2) for s in (0, 1, 2)] + [("LoRA r2", s, 1e-2) for s in (0, 1, 2)] + [
        ("LoRA r2", s, 3e-3) for s in (0, 1, 2)]
    rows = {r["method"]: r for r in summarise(counted(runs, "subjectivity"), "subjectivity")}
    assert rows["LoRA r1"]["settings"]["lr"] == 1e-2  # the family's choice stands
    assert rows["LoRA r2"]["settings"]["lr"] == 3e-3 and rows["LoRA r2"]["seeds"] == 3 and not rows["LoRA r2"][
        "collapsed"]
    assert collapse_lines(runs) == [
        "Collapsed to the majority class during training, subjectivity LoRA r2 (lr 0.01): seed 1 [50.0, 50.0]. "
        "The protocol replaced these settings with the family's best trial at a lower learning rate (lr 0.003), "
        "which the figures use."]
    marks = [line.rsplit("|", 2)[1].strip() for line in grid_table(runs, "subjectivity").splitlines()]
    assert marks.count("chosen") == 1 and not any("replace" in mark for mark in marks)


def _worker_in_process(rounds: list[tuple[str, int]]):
    def in_process(args, store, work, stage, task, names, seeds):  # the subprocess's work, in this process
        rounds.append((stage, seeds[0]))
        runs = workers.worker_runs(work, store, stage, task, names, seeds)
        runs.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(runs, store.path.read_bytes())
        worker = protocol.Protocol(parse_args(workers.worker_argv(args, runs, stage, task, names, seeds)),
                                   RunStore(runs, resume=True), runs.parent)
        worker.splits = lambda task: None
        worker.classification()

    return in_process


def test_a_members_finals_run_in_rounds_until_every_seed_has_run_where_it_settled(monkeypatch, tmp_path):
    rounds = []
    monkeypatch.setattr(protocol, "run_classifier", _lr_01_wins_and_collapses_on_seed_1("LoRA r2"))
    monkeypatch.setattr(workers, "_worker", _worker_in_process(rounds))
    args = parse_args(["--out", str(tmp_path), "--workers", "3", "--tasks", "subjectivity", "--only", "LoRA r1",
                       "LoRA r2", "--stages", "tune", "choice", "members"])
    store = RunStore(tmp_path / "quality_protocol_runs.json", resume=False)
    store.save()
    workers.run_workers(args, store, tmp_path / "work")
    # Round 1: LoRA r2 on every seed at the family's lr 0.01, where seed 1 collapses and its worker goes on
    # to lr 0.003; round 2: seeds 0 and 2 at lr 0.003 too.
    assert sorted(r for r in rounds if r[0] == "members") == [("members", s) for s in (0, 0, 1, 2, 2)]
    finals = sorted((r["settings"]["lr"], r["seed"]) for r in store.runs if r["method"] == "LoRA r2")
    assert finals == [(lr, s) for lr in (3e-3, 1e-2) for s in (0, 1, 2)]


def test_the_choice_runs_a_seed_per_worker_in_rounds_until_every_seed_has_run_at_the_choice(monkeypatch, tmp_path):
    rounds = []
    monkeypatch.setattr(protocol, "run_classifier", _lr_01_wins_and_collapses_on_seed_1("LoRA r1"))
    monkeypatch.setattr(workers, "_worker", _worker_in_process(rounds))
    args = parse_args(["--out", str(tmp_path), "--workers", "3", "--tasks", "subjectivity", "--only", "LoRA r1",
                       "--stages", "tune", "choice"])
    store = RunStore(tmp_path / "quality_protocol_runs.json", resume=False)
    store.save()
    workers.run_workers(args, store, tmp_path / "work")
    # Round 1: every seed at lr 0.01, where seed 1 collapses and its worker goes on to lr 0.003;
    # round 2: seeds 0 and 2 at lr 0.003 too. The same finals as one process running seed after seed.
    assert sorted(rounds) == [("choice", s) for s in (0, 0, 1, 2, 2)] + [("tune", 0)]
    finals = sorted((r["settings"]["lr"], r["seed"]) for r in store.runs if r["phase"] == "final")
    assert finals == [(lr, s) for lr in (3e-3, 1e-2) for s in (0, 1, 2)]
    rounds.clear()  # resumed: no process for a seed that has run where it settled
    workers.run_workers(args, store, tmp_path / "work")
    assert rounds == [("tune", 0)]


def test_the_longer_budget_check_retrains_the_headline_at_its_choice_and_reports_the_gap(monkeypatch, tmp_path):
    budgets = set()

    def by_method(task, method, settings, seed, final, optim, *rest):  # LoRA ahead at 3 epochs, level when longer
        budgets.add((final, optim.epochs, optim.early_stopping_patience))
        score = 80.0 + (2.0 if method.family == "lora" and optim.epochs == 3 else 0.0)
        return {"validation_accuracy": score / 100, "validation_by_epoch": [70.0, score], "test_accuracy": score / 100,
                "train_seconds": 0.0, "params": 1, "params_with_head": 2}

    monkeypatch.setattr(protocol, "run_classifier", by_method)
    args = parse_args(["--out", str(tmp_path), "--tasks", "sentiment", "--no-lm", "--stages", "choice", "long"])
    sequence = protocol.Protocol(args, RunStore(tmp_path / "runs.json", resume=False), tmp_path)
    sequence.splits = lambda task: None
    sequence.classification()
    long = [r for r in sequence.store.runs if r["phase"] == "long"]
    checked = ("DCFT k8", "DCFT k8 s4", "LoRA r1")  # on sentiment also DCFT's best setting at 3 epochs
    assert sorted((r["method"], r["seed"]) for r in long) == [(m, s) for m in checked for s in (0, 1, 2)]
    dcft_choice = [r["settings"] for r in sequence.store.runs if (r["phase"], r["method"]) == ("final", "DCFT k8")]
    assert all(r["settings"] == dcft_choice[0] for r in long if r["family"] == "dcft")  # the family's choice
    assert budgets == {(False, 3.0, 1), (True, 3.0, 1), (True, 8.0, 2)}  # tuning, finals, the check
    assert {r["method"] for r in sequence.store.runs if r["phase"] == "final"} == set(REPRESENTATIVE.values())
    line = long_lines(sequence.store.runs, "sentiment")[0]
    assert line.startswith("sentiment, longer budget (up to 8 epochs, patience 2, at the 3-epoch choice): DCFT k8 ")
    assert line.endswith("DCFT k8 vs LoRA r1: +0.0 points (3 epochs: -2.0).")
    assert "DCFT k8 s4 80.0 ± 0.0 over 3 seeds (3 epochs: not run yet;" in line  # no gap without its finals
    one_seed = [r for r in sequence.store.runs if r["phase"] != "long" or (r["method"], r["seed"]) == ("DCFT k8", 0)]
    assert "DCFT k8 80.0 over 1 seed (3 epochs: 80.0 ± 0.0;" in long_lines(one_seed, "sentiment")[0]
    two_seeds = [r for r in sequence.store.runs if r["phase"] != "long" or r["seed"] < 2]
    assert "vs LoRA r1" not in long_lines(two_seeds, "sentiment")[0]  # no gap until every seed has run
    sequence.members("sentiment", "dcft")  # DCFT k8 s4's 3-epoch finals (at 80.0): now it has a gap too
    line = long_lines(sequence.store.runs, "sentiment")[0]
    assert line.endswith("DCFT k8 vs LoRA r1: +0.0 points (3 epochs: -2.0). "
                         "DCFT k8 s4 vs LoRA r1: +0.0 points (3 epochs: -2.0).")
    write(args, sequence.store, complete=False)  # the check's means go to the JSON (and the plot, as open markers)
    checks = json.loads((tmp_path / "quality_partial.json").read_text())["longer_budget"]
    means = {(r["method"], r["seeds"], r["accuracy_mean"]) for r in checks}
    assert means == {(m, 3, 80.0) for m in checked}


def test_workers_run_a_familys_stages_in_order_and_the_check_beside_the_members(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(workers, "_worker", lambda args, store, work, *job: calls.append(job))
    args = parse_args(["--out", str(tmp_path), "--workers", "1", "--tasks", "sentiment", "--seeds", "0", "1",
                       "--only", "LoRA r1", "LoRA r2"])
    store = RunStore(tmp_path / "runs.json", resume=False)
    store.save()
    workers.run_workers(args, store, tmp_path / "work")
    lora = ("sentiment", ["LoRA r1"])
    assert calls == [("tune", *lora, [0]), ("choice", *lora, [0]), ("choice", *lora, [1]), ("long", *lora, [0]),
                     ("long", *lora, [1]), ("members", "sentiment", ["LoRA r2"], [0]),
                     ("members", "sentiment", ["LoRA r2"], [1])]


def test_a_familys_finals_start_while_another_familys_grid_still_runs(monkeypatch, tmp_path):
    """No family waits on another's grid: with LoKr's grid running, head only's finals take the free worker."""
    import threading

    head_finals_started = threading.Event()
    calls, grid_saw_finals = [], []

    def worker(args, store, work, stage, task, names, seeds):  # stands in for the subprocess
        calls.append((stage, names[0]))
        if (stage, names[0]) == ("choice", "head only"):
            head_finals_started.set()
        if (stage, names[0]) == ("tune", "LoKr r1"):  # LoKr's grid ends only once head only's finals start
            grid_saw_finals.append(head_finals_started.wait(10))

    monkeypatch.setattr(workers, "_worker", worker)
    args = parse_args(["--out", str(tmp_path), "--workers", "2", "--tasks", "sentiment", "--seeds", "0",
                       "--only", "LoKr r1", "head only"])
    store = RunStore(tmp_path / "runs.json", resume=False)
    store.save()
    workers.run_workers(args, store, tmp_path / "work")
    assert sorted(calls) == [("choice", "LoKr r1"), ("choice", "head only"), ("tune", "LoKr r1"),
                             ("tune", "head only")]
    assert grid_saw_finals == [True], "head only's finals waited for LoKr's grid"


def test_a_failed_worker_stops_its_family_only(monkeypatch, tmp_path, capsys):
    """A family's later stages need what its failed worker left (the sequential pass after runs it); others go on."""
    calls = []

    def worker(args, store, work, stage, task, names, seeds):  # stands in for the subprocess
        calls.append((stage, names[0]))
        if (stage, names[0]) == ("tune", "head only"):
            raise RuntimeError("worker sentiment ['head only'] failed")

    monkeypatch.setattr(workers, "_worker", worker)
    args = parse_args(["--out", str(tmp_path), "--workers", "2", "--tasks", "sentiment", "--seeds", "0",
                       "--only", "LoKr r1", "head only"])
    store = RunStore(tmp_path / "runs.json", resume=False)
    store.save()
    workers.run_workers(args, store, tmp_path / "work")
    assert sorted(calls) == [("choice", "LoKr r1"), ("tune", "LoKr r1"), ("tune", "head only")]
    assert "worker sentiment ['head only'] failed" in capsys.readouterr().out


def test_a_peft_baseline_trains_through_its_wrapper_with_its_own_parameter_names(tmp_path):
    """The baselines' tensor names live with the benchmark: LoRA's B at the multiplied rate (LoRA+),
    its A at the adapter rate, and training/ knows only DCFT's names."""
    import torch

    from backbones.loading import load_backbone
    from benchmarks.quality.grid import Method
    from benchmarks.quality.runs import PEFT_PARAMS, prepare
    from training.config import OptimConfig
    from training.train import DCFT_PARAMS, param_groups

    assert not any("lora" in marker for marker in DCFT_PARAMS.adapter + DCFT_PARAMS.multiplied)
    model = load_backbone(tiny_llama_dir(tmp_path / "llama"), "causal_lm", device=torch.device("cpu"))
    wrapped, roles = prepare(Method("lora", "lora", rank=1), Settings(lr=1e-3), model, targets=["q_proj"])
    assert roles is PEFT_PARAMS and wrapped is not model  # PEFT's wrapper is what trains, kept by the caller
    optim = OptimConfig(learning_rate=1e-3, kernel_lr_multiplier=4.0)
    by_lr = {group["lr"]: group["params"] for group in param_groups(wrapped, optim, roles)}
    names = {id(p): n for n, p in wrapped.named_parameters()}
    assert by_lr[4e-3] and all(".lora_B." in names[id(p)] for p in by_lr[4e-3])
    assert by_lr[1e-3] and all(".lora_A." in names[id(p)] for p in by_lr[1e-3])
