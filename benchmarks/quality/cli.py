"""`python -m benchmarks quality`: parse the options, run the protocol (resuming), write the report."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from backbones.shipped import SMOLLM2
from benchmarks.quality.grid import SEEDS, STAGES, TASKS
from benchmarks.quality.protocol import Protocol, causal_lm
from benchmarks.quality.report import write
from benchmarks.quality.store import RunStore
from benchmarks.quality.workers import run_workers
from benchmarks.report import RESULTS_DIR

DESCRIPTION = """Quality protocol: DCFT against LoRA, PEFT LoKr, head-only and full fine-tuning on two
classification tasks with the real MiniLM, and SmolLM2-135M perplexity bare vs DCFT vs LoRA.

    python -m benchmarks.quality --resume   # the whole protocol: many hours on 2 CPU cores
    python -m benchmarks.quality --smoke    # well under a minute: what the test suite runs
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--only", nargs="+", help="method names to run (default: all)")
    parser.add_argument("--lm-model", default=SMOLLM2, help="causal LM backbone (folder or alias)")
    parser.add_argument("--lm-train-examples", type=int, default=800)
    parser.add_argument("--no-lm", action="store_true", help="skip the causal-LM comparison")
    parser.add_argument("--resume", action="store_true", help="keep the runs in <out>/quality_protocol_runs.json")
    parser.add_argument("--report-only", action="store_true", help="write the partial report from the saved runs")
    parser.add_argument("--smoke", action="store_true", help="a few examples, one trial per family (tests)")
    parser.add_argument("--workers", type=int, default=1, help="classification runs at once (see above)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES),
                        help="classification stages to run (default: all): tune = the grids, choice = each "
                             "family's finals that settle its settings, long = the longer-budget check, members")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.add_argument("--checkpoints", type=Path, help="where unfinished runs keep their epochs for --resume "
                        "(default: <out>/quality_checkpoints)")
    args = parser.parse_args(argv)
    args.checkpoints = args.checkpoints or args.out / "quality_checkpoints"
    if args.smoke:
        args.tasks, args.seeds, args.epochs = args.tasks[:1], [0], 1.0
        args.only = args.only or ["head only", "DCFT k8", "LoRA r1"]
        args.stages = [stage for stage in args.stages if stage != "long"]  # the check's 8 epochs add nothing here
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
    if not args.resume:  # a fresh protocol continues no run from an earlier one's epochs
        for unfinished in args.checkpoints.glob("*/checkpoints"):
            shutil.rmtree(unfinished.parent)
    with tempfile.TemporaryDirectory() as work:
        def partial_report() -> None:
            if not args.smoke:
                write(args, store, complete=False)

        if args.workers > 1:
            run_workers(args, store, Path(work), on_merge=partial_report)
        protocol = Protocol(args, store, args.checkpoints)
        protocol.on_run = partial_report
        if not args.no_lm:  # first: the shortest complete comparison (about 2 hours on 2 CPU cores)
            causal_lm(args, store, Path(work), protocol.on_run)
        protocol.classification()
    complete = not args.only and not args.no_lm and args.tasks == list(TASKS)
    print(f"report: {write(args, store, complete and not args.smoke)}")
