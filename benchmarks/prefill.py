"""A long prompt joining running generations: whole vs chunked prefill.

    python -m benchmarks prefill            # SmolLM2-135M (real weights), about 3 minutes on 2 CPU cores
    python -m benchmarks prefill --smoke    # tiny random Llama (tests)

In-process, no HTTP: one replica's continuous decoder with `--running` sequences decoding
(short prompts, one random DCFT adapter each), then one `--prompt-tokens` prompt joins. For
each `prefill_chunk_tokens` setting (none = the whole prompt in one forward pass) this
measures the running sequences' inter-token gap: its median before the long prompt arrived,
and its largest from the long prompt's arrival to its first token (the stall it causes),
and the long prompt's time to first token. Each setting runs `--rounds` times; the report
gives the medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

from adapters.store.hub import AdapterHub
from benchmarks.report import RESULTS_DIR, write_report
from serving.calls import DecodeEvent
from serving.config import EngineConfig
from serving.decoder import DecodeRequest
from serving.rows import Sampling
from serving.service import ModelService

COLUMNS = ["prefill_chunk_tokens", "itl_before_ms", "worst_itl_while_joining_ms", "stall_ratio", "long_ttft_ms",
           "decode_steps_while_joining"]


class Timeline:
    """When each sequence's tokens came out (decode thread), and the decoder's step count then."""

    def __init__(self):
        self.times: dict[int, list[float]] = {}
        self.steps: dict[int, list[int]] = {}
        self.lock = threading.Lock()

    def emitter(self, name: int, decoder):
        def emit(event: DecodeEvent) -> None:
            with self.lock:
                self.times.setdefault(name, []).append(time.perf_counter())
                self.steps.setdefault(name, []).append(decoder.steps)
        return emit


def one_round(service: ModelService, running: int, prompt_tokens: int, warm_tokens: int, run_tokens: int) -> dict:
    engine, decoder = service.engine, service.engine.decoder
    key = engine.resolve("bench/writer")
    short = engine.encode_prompt("a gripping film about", key, Sampling(max_tokens=1)).prompt_ids
    long_ids = tuple((short * (prompt_tokens // len(short) + 1))[:prompt_tokens])
    timeline = Timeline()
    # Enough tokens to outlast the long prompt's prefill; they are cancelled right after it joins.
    requests = [DecodeRequest(key, short, Sampling(max_tokens=run_tokens), timeline.emitter(i, decoder))
                for i in range(running)]
    for request in requests:
        decoder.submit(request)
    wait(lambda: all(len(timeline.times.get(i, ())) >= warm_tokens for i in range(running)))
    arrived, steps_at = time.perf_counter(), decoder.steps
    decoder.submit(DecodeRequest(None, long_ids, Sampling(max_tokens=1), timeline.emitter(-1, decoder)))
    wait(lambda: -1 in timeline.times)
    first = timeline.times[-1][0]
    wait(lambda: all(timeline.times[i][-1] > first for i in range(running)))  # the step after it joined
    for request in requests:
        request.cancelled.set()
    wait(lambda: decoder.running() == 0)
    before, during = [], []
    for i in range(running):
        times = timeline.times[i]
        gaps = list(zip(times, times[1:], strict=False))
        before += [b - a for a, b in gaps if b <= arrived]
        during += [b - a for a, b in gaps if b > arrived and a <= first]
    return {"itl_before_ms": 1e3 * statistics.median(before), "worst_itl_while_joining_ms": 1e3 * max(during),
            "long_ttft_ms": 1e3 * (first - arrived), "decode_steps_while_joining": timeline.steps[-1][0] - steps_at}


def wait(condition, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the decoder did not get there in time")
        time.sleep(0.001)


def measure(model_dir: Path, hub: AdapterHub, chunk: int | None, args: argparse.Namespace) -> dict:
    config = EngineConfig(model=str(model_dir), hub=hub.url, kernel_size=args.kernel, max_running=args.running + 1,
                          kv_cache_len=args.prompt_tokens + 512, prefill_chunk_tokens=chunk)
    service = ModelService(config)
    try:
        rounds = [one_round(service, args.running, args.prompt_tokens, args.warm_tokens, args.run_tokens)
                  for _ in range(args.rounds)]
    finally:
        service.close()
    row = {"prefill_chunk_tokens": chunk if chunk is not None else "whole"}
    row |= {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    row["stall_ratio"] = row["worst_itl_while_joining_ms"] / row["itl_before_ms"]
    print(f"chunk {row['prefill_chunk_tokens']!s:>6}: ITL before {row['itl_before_ms']:7.1f} ms, worst while "
          f"joining {row['worst_itl_while_joining_ms']:7.1f} ms ({row['stall_ratio']:.1f}x), long TTFT "
          f"{row['long_ttft_ms']:7.1f} ms", flush=True)
    return row


def summarise(rows: list[dict], args: argparse.Namespace) -> str:
    """Whole prefill against the default chunk size (or the smallest gap, when the default was not run)."""
    whole = next((r for r in rows if r["prefill_chunk_tokens"] == "whole"), None)
    chunked = [r for r in rows if r["prefill_chunk_tokens"] != "whole"]
    if whole is None or not chunked:
        return "(no 'whole' row or no chunked row: nothing to compare)"
    default = EngineConfig().prefill_chunk_tokens
    pick = next((r for r in chunked if r["prefill_chunk_tokens"] == default),
                min(chunked, key=lambda r: r["worst_itl_while_joining_ms"]))
    label = "the default " if pick["prefill_chunk_tokens"] == default else ""
    return (f"A {args.prompt_tokens}-token prompt joining {args.running} running sequences stalls them for "
            f"{whole['worst_itl_while_joining_ms']:.0f} ms with whole prefill ({whole['stall_ratio']:.1f}x their "
            f"usual inter-token gap); in {label}{pick['prefill_chunk_tokens']}-token chunks the worst gap is "
            f"{pick['worst_itl_while_joining_ms']:.0f} ms ({pick['stall_ratio']:.1f}x), and the long prompt's "
            f"first token comes after {pick['long_ttft_ms']:.0f} ms instead of {whole['long_ttft_ms']:.0f} ms")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", nargs="+", default=["whole", "256", "128", "64"],
                        help="prefill_chunk_tokens settings ('whole': no chunking)")
    parser.add_argument("--running", type=int, default=4, help="sequences decoding when the long prompt joins")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--warm-tokens", type=int, default=8, help="tokens each running sequence makes first")
    parser.add_argument("--run-tokens", type=int, default=300, help="max_tokens of the running sequences")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kernel", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--model", default=None, help="backbone alias or folder (default: smollm2)")
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, short prompts")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    args = parser.parse_args(argv)
    if args.smoke:
        args.chunks, args.prompt_tokens, args.rounds, args.kernel, args.running = ["whole", "16"], 64, 1, 4, 2
        args.run_tokens = 50
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    import torch

    from backbones.shipped import SMOLLM2, resolve_model_dir
    from benchmarks.fixtures import random_adapter, tiny_llama_dir

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="dcft-bench-prefill-") as tmp:
        root = Path(tmp)
        os.environ["DCFT_HUB_CACHE"] = str(root / "cache")
        if args.model:
            model_dir = resolve_model_dir(args.model)
        else:
            model_dir = tiny_llama_dir(root / "llama") if args.smoke else resolve_model_dir(SMOLLM2)
        hub = AdapterHub(str(root / "hub"))
        adapter = random_adapter(model_dir, root / "adapter", "causal_lm", seed=0, kernel=args.kernel)
        hub.publish(adapter, "bench/writer")
        rows = [measure(model_dir, hub, None if c == "whole" else int(c), args) for c in args.chunks]
    summary = summarise(rows, args)
    model = "tiny random Llama (smoke)" if args.smoke else f"`{args.model or SMOLLM2}` (real weights)"
    notes = (f"{summary}.\n\nWhat ran where: CPU only ({os.cpu_count()} cores), in-process (no HTTP), backbone "
             f"{model}, one random DCFT adapter (kernel {args.kernel}) on the running sequences, the bare backbone "
             f"for the long prompt; medians over {args.rounds} rounds per setting. ITL before = median gap "
             f"between the running sequences' tokens before the long prompt arrived; worst while joining = the "
             f"largest gap from its arrival to its first token; decode steps while joining = the running "
             f"sequences' steps in that time. Regenerate: `python -m benchmarks prefill`.")
    name = "prefill_smoke" if args.smoke else "prefill"
    path = write_report(name, "Chunked prefill: a long prompt joining running generations", rows, COLUMNS, notes,
                        out_dir=args.out)
    print(summary)
    print(f"report: {path}")
    return rows


if __name__ == "__main__":
    main()
