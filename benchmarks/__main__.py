"""One entry point for every benchmark: `python -m benchmarks NAME [its options]`.

    python -m benchmarks list              # what there is
    python -m benchmarks forward --smoke   # any benchmark's own options follow its name
    python -m benchmarks anchors           # the performance anchors: forward, load, capacity, train_step

Each writes JSON + markdown (+ PNG where it plots) into benchmarks/results/, with the
machine, versions and settings recorded.
"""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "layer": "one target layer: bare vs factored vs a 64-adapter mixed batch",
    "kernels": "one mixed layer on CUDA: the torch path vs the fused Triton kernels (--smoke: interpreter)",
    "forward": "whole model: bare vs DCFT mixed batches vs PEFT LoRA (mixed) and LoKr",
    "load": "adapter load latency into the bank and into a merged replica, vs PEFT",
    "capacity": "bytes per adapter, adapters per 2 GiB, 100,000 resident adapters served",
    "train_step": "training step time: DCFT vs PEFT LoRA r1 vs dense dW every step",
    "quality": "sentiment and subjectivity accuracy, SmolLM2 perplexity: DCFT vs LoRA, LoKr, head, full",
    "serving": "HTTP throughput with 1..1,000 adapters vs Ray model multiplexing",
    "soak": "minutes of traffic with hot swaps: every answer checked against its version alone",
    "fairness": "one tenant floods: the other tenant's latency, with and without a quota",
    "generation": "open-loop streaming completions, 64 adapters: static vs continuous batching",
    "scale": "1 and 2 replicas on a local multi-node cluster, 1,000 adapters: adapter-aware routing vs not",
    "decode": "the decoder's step: bare model vs DCFT with 0 and 64 adapters, and dispatched ops per layer",
    "prefill": "a long prompt joining running generations: whole vs chunked prefill (inter-token stall, TTFT)",
    "finetune": "fine-tuning jobs: upload to first served token, a job vs `dcft train`, serving beside a job",
}
ANCHORS = ["forward", "load", "capacity", "train_step"]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("list", "-h", "--help"):
        print(__doc__)
        for name, what in BENCHMARKS.items():
            print(f"  {name:<11} {what}")
        return
    name, rest = argv[0], argv[1:]
    names = ANCHORS if name == "anchors" else [name]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark {unknown[0]!r}; `python -m benchmarks list` shows them")
    for each in names:
        print(f"== {each} ==", flush=True)
        importlib.import_module(f"benchmarks.{each}").main(rest)


if __name__ == "__main__":
    main()
