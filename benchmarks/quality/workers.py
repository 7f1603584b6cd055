"""The classification protocol in many processes at once (a GPU fits many MiniLM runs).

Every run is saved to `<out>/quality_protocol_runs.json` as it finishes (`--resume` skips the
finished ones, and continues an unfinished one from its last finished epoch). `--workers N` first
runs the classification protocol in N processes. Each (task, family) goes through its stages on its
own: its tuning grid in one process, then its choice (its representative's finals, one seed per
process, in rounds until every seed has run at the choice), then its longer-budget check and its
other members' finals, one (method, seed) per process, again in rounds for a member whose own finals
collapsed. A family's stage waits only for that family's stage before it, never for another family's
grid.
Each worker resumes from a copy of the runs, and the parent merges its new runs as they land;
the sequential pass that follows then finds those runs done (and runs any a failed worker left).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Generator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path

from adapters.store.atomic import write_atomic
from benchmarks.quality.choice import finals_at, settled
from benchmarks.quality.grid import BY_NAME, HEADLINE, METHODS, REPRESENTATIVE, REST, checked, families_of
from benchmarks.quality.store import RunStore

MERGE_EVERY_S = 20

Job = tuple[str, str, list[str], list[int]]  # (stage, task, method names, seeds): one worker process
Batches = Generator[list[Job], int, None]  # one (task, family)'s jobs; sent how many runs each batch added


def run_workers(args: argparse.Namespace, store: RunStore, work: Path, on_merge=lambda: None) -> None:
    """The classification protocol's runs in `args.workers` processes, merged into `store`, each
    (task, family) batch after batch (`family_batches`); a family's next batch starts as soon as its
    own batch before has finished. Each worker's runs are merged as they finish, so a worker stopped
    part way (a time limit, the machine going away) keeps what it finished. A failed worker stops its
    family here; the sequential pass after runs what it left."""
    families = families_of(HEADLINE + REST, args.only)
    batches = [family_batches(args, store, task, family) for task in args.tasks for family in families]
    with ThreadPoolExecutor(args.workers) as pool:
        running: dict[Future, tuple[Job, Batches]] = {}
        added: dict[Future, int] = {}  # runs merged from each worker
        batch_of: dict[Batches, list[Future]] = {}  # each family's current batch

        def start(family: Batches, runs_added: int | None = None) -> None:
            """Submits the family's next batch (its first when `runs_added` is None), if it has one."""
            try:
                batch = next(family) if runs_added is None else family.send(runs_added)
            except StopIteration:
                return
            batch_of[family] = [pool.submit(_worker, args, store, work, *job) for job in batch]
            for future, job in zip(batch_of[family], batch, strict=True):
                running[future], added[future] = (job, family), 0

        for family in batches:
            start(family)
        while running:  # merged here, in this thread only
            done, _ = wait(running, timeout=MERGE_EVERY_S, return_when=FIRST_COMPLETED)
            before = len(store.runs)
            for future, (job, _) in running.items():
                added[future] += store.merge(worker_runs(work, store, *job))
            if len(store.runs) > before:
                on_merge()
            for future in done:
                (stage, task, names, seeds), family = running.pop(future)
                if (error := future.exception()) is not None:
                    print(error, flush=True)
                    family.close()  # its later batches would need what this one left
                    continue
                print(f"worker {stage} {task} {', '.join(names)} seeds {seeds}: {added[future]} new runs", flush=True)
                if not any(f in running for f in batch_of[family]):
                    start(family, sum(added[f] for f in batch_of[family]))


def family_batches(args: argparse.Namespace, store: RunStore, task: str, family: str) -> Batches:
    """One (task, family)'s worker jobs, batch after batch, each batch sent how many runs it added: its
    grid; then its choice; then its longer-budget check and its other members, which need only the choice."""
    name, only = REPRESENTATIVE[family], args.only
    if "tune" in args.stages:
        yield [("tune", task, [name], args.seeds[:1])]
    yield from _settling(args, store, task, "choice", [name] if "choice" in args.stages else [])
    long = [n for n in checked(task) if BY_NAME[n].family == family] if "long" in args.stages else []
    members = [m.name for m in METHODS if m.family == family and m.name != name] if "members" in args.stages else []
    yield from _settling(args, store, task, "members", [n for n in members if not only or n in only],
                         beside=[("long", task, [n], [seed]) for n in long if not only or n in only
                                 for seed in args.seeds])


def _settling(args: argparse.Namespace, store: RunStore, task: str, stage: str, names: list[str],
              beside: Sequence[Job] = ()) -> Batches:
    """The finals of `names` (and the jobs `beside` them), a seed per process; then again for each method
    whose settings a seed's collapse moved (choice.py), until every seed has run at the settings it settled
    on. Only seeds with a run left to do get a process (a resumed protocol has most of them)."""
    jobs = [*beside, *[(stage, task, [name], [seed]) for name in names for seed in args.seeds]]
    while jobs := [job for job in jobs if _seeds_left(store.runs, *job)]:
        if not (yield jobs):  # a round that added nothing would only repeat itself
            return
        jobs = [(stage, task, [name], [seed]) for name in names for seed in args.seeds]


def _seeds_left(runs: list[dict], stage: str, task: str, names: list[str], seeds: list[int]) -> list[int]:
    """The seeds on which the method still lacks its run of `stage` at the settings it settled on (choice.py;
    the longer-budget check uses its family's choice): all of them before its family's grid has run."""
    (name,) = names
    phase, settler = ("long", REPRESENTATIVE[BY_NAME[name].family]) if stage == "long" else ("final", name)
    if not (tried := settled(runs, task, settler)):
        return seeds
    done = {r["seed"] for r in finals_at(runs, task, name, tried[-1], phase)}
    return [seed for seed in seeds if seed not in done]


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
