"""The classification protocol in many processes at once (a GPU fits many MiniLM runs).

Every run is saved to `<out>/quality_protocol_runs.json` as it finishes (`--resume` skips the
finished ones, and continues an unfinished one from its last finished epoch). `--workers N` first
runs the classification protocol in N processes: every (task, family) tuning grid in its own
process, then every family's choice (its representative's finals, one seed per process, in rounds
until every seed has run at the choice), then the headline's longer-budget check and every other
final run, one (task, method, seed) per process.
Each worker resumes from a copy of the runs, and the parent merges its new runs as they land;
the sequential pass that follows then finds those runs done (and runs any a failed worker left).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from adapters.store.atomic import write_atomic
from benchmarks.quality.choice import chosen, finals_at
from benchmarks.quality.grid import BY_NAME, HEADLINE, METHODS, REPRESENTATIVE, REST, checked, families_of
from benchmarks.quality.store import RunStore

MERGE_EVERY_S = 20


def run_workers(args: argparse.Namespace, store: RunStore, work: Path, on_merge=lambda: None) -> None:
    """The classification protocol's runs in `args.workers` processes, merged into `store`:
    first every (task, family) tuning grid (its stages depend on each other, the grids do not),
    then every family's choice (its representative's finals on every seed, which may replace the
    grid's pick: choice.py), then the headline's longer-budget runs and every other member's final run
    (task, method, seed): the stages in `args.stages`. The choice runs one seed per process in rounds:
    a seed that collapses moves every seed to the next candidate, which the next round runs, until a
    round leaves every seed run at the choice (the finals a single process would run, seed after seed).
    Each worker's runs are merged as they finish, so a worker stopped part way (a time limit,
    the machine going away) keeps what it finished."""
    families = families_of(HEADLINE + REST, args.only)
    representatives = [(task, REPRESENTATIVE[f]) for task in args.tasks for f in families]
    others = [m.name for m in METHODS if m.family in families and m.name != REPRESENTATIVE[m.family]
              and (not args.only or m.name in args.only)]
    jobs_of = {  # (task, method names, seeds) per worker
        "tune": [(task, [name], args.seeds[:1]) for task, name in representatives],
        "choice": [(task, [name], [seed]) for task, name in representatives for seed in args.seeds],
        "long": [(task, [name], [seed]) for task in args.tasks for name in checked(task) for seed in args.seeds
                 if BY_NAME[name].family in families and (not args.only or name in args.only)],
        "members": [(task, [name], [seed]) for task in args.tasks for name in others for seed in args.seeds],
    }
    # A wave starts once the one before has finished: a choice needs its grid, and the longer-budget
    # check and the members need only the choices, so they share a wave (no core waits on a barrier).
    for wave in (("tune",), ("choice",), ("long", "members")):
        jobs = [(stage, *job) for stage in wave if stage in args.stages for job in jobs_of[stage]]
        added = _run_wave(args, store, work, jobs, on_merge)
        while "choice" in wave and added and _unsettled(store.runs, representatives, args.seeds):
            added = _run_wave(args, store, work, jobs, on_merge)  # a seed's collapse moved a choice


def _unsettled(runs: list[dict], representatives: list[tuple[str, str]], seeds: list[int]) -> bool:
    """Whether a family's choice (choice.py) still lacks its representative's final on some seed."""
    for task, name in representatives:
        tried = chosen(runs, task).get(BY_NAME[name].family)  # None: its grid did not finish
        if tried and set(seeds) - {r["seed"] for r in finals_at(runs, task, name, tried[-1])}:
            return True
    return False


def _run_wave(args: argparse.Namespace, store: RunStore, work: Path, wave: list[tuple], on_merge) -> int:
    """Runs the wave's jobs (stage, task, names, seeds) in `args.workers` processes, merging their runs;
    returns how many runs they added."""
    with ThreadPoolExecutor(args.workers) as pool:
        jobs = {pool.submit(_worker, args, store, work, *job): job for job in wave}
        added = dict.fromkeys(jobs, 0)
        pending = set(jobs)
        while pending:  # merged here, in this thread only
            done, pending = wait(pending, timeout=MERGE_EVERY_S, return_when=FIRST_COMPLETED)
            before = len(store.runs)
            for future in jobs:
                added[future] += store.merge(worker_runs(work, store, *jobs[future]))
            if len(store.runs) > before:
                on_merge()
            for future in done:
                stage, task, names, seeds = jobs[future]
                if (error := future.exception()) is not None:  # the sequential pass after runs what it left
                    print(error, flush=True)
                else:
                    print(f"worker {stage} {task} {', '.join(names)} seeds {seeds}: {added[future]} new runs",
                          flush=True)
    return sum(added.values())


def worker_runs(work: Path, store: RunStore, stage: str, task: str, names: list[str], seeds: list[int]) -> Path:
    """Where the worker for (stage, task, names, seeds) keeps its copy of the runs."""
    name = f"{stage}-{task}-{'-'.join(names).replace(' ', '_')}-{'-'.join(map(str, seeds))}"
    return work / "workers" / name / store.path.name


def worker_argv(args: argparse.Namespace, runs: Path, stage: str, task: str, names: list[str],
                seeds: list[int]) -> list[str]:
    """The worker's `python -m benchmarks.quality` arguments: one stage of one job, resumed from `runs`."""
    return ["--resume", "--no-lm", "--tasks", task, "--only", *names, "--seeds", *map(str, seeds),
            "--epochs", str(args.epochs), "--out", str(runs.parent), "--checkpoints", str(args.checkpoints),
            "--stages", stage] + ["--smoke"] * args.smoke


def _worker(args: argparse.Namespace, store: RunStore, work: Path, stage: str, task: str, names: list[str],
            seeds: list[int]) -> None:
    """One `python -m benchmarks.quality` on its own copy of the runs, which the parent merges from."""
    runs = worker_runs(work, store, stage, task, names, seeds)
    runs.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(runs, store.path.read_bytes())
    command = [sys.executable, "-m", "benchmarks.quality", *worker_argv(args, runs, stage, task, names, seeds)]
    threads = str(max(1, (os.cpu_count() or 1) // args.workers))  # the workers share the host's cores
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": threads}, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker {task} {names} failed:\n{done.stdout[-2000:]}{done.stderr[-4000:]}")
