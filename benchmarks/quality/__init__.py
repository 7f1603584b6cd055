"""Quality protocol (issue 14): DCFT against LoRA, PEFT LoKr, head-only and full fine-tuning on
two classification tasks with the real MiniLM, and SmolLM2-135M perplexity bare vs DCFT vs LoRA.

    python -m benchmarks.quality --resume   # the whole protocol: many hours on 2 CPU cores
    python -m benchmarks.quality --smoke    # well under a minute: what the test suite runs

The parts, each importing only those above it:
- `grid.py`: the protocol itself: tasks, methods, each family's staged grid;
- `choice.py`: which settings a family's finals use (the grid's pick unless it collapses on a seed);
- `runs.py`: one run (train, score); `store.py`: the finished runs, saved as each finishes;
- `protocol.py`: the order of runs, in stages (tune, choice, long, members); `workers.py`: many runs
  at once in processes, each family through its stages on its own;
- `report.py`: the report; `cli.py`: the command.
"""

from benchmarks.quality.cli import main

__all__ = ["main"]
