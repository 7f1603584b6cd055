"""HTTP serving benchmark on 127.0.0.1: dcft-hub with 1, 10, 100 and 1,000 distinct adapters
under uniform traffic, against itself with one adapter and against a Ray Serve
model-multiplexing baseline (one merged model per adapter), all in one run.

    python -m benchmarks.serving              # full (about 10 minutes on 2 CPU cores)
    python -m benchmarks.serving --smoke      # seconds-scale check

Closed loop: `--concurrency` clients, each sends one review per request to an adapter
drawn uniformly at random, bounded by `--requests` and `--seconds` per point.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from adapters.backbones import MINILM, resolve_model_dir
from adapters.files import read_adapter_config, read_adapter_tensors, write_adapter_dir
from adapters.registry import AdapterHub
from benchmarks.report import write_report
from serving.config import EngineConfig, ServeConfig
from training.data import DataConfig, load_dataset


def publish_adapters(hub: AdapterHub, template: Path, count: int, work: Path) -> list[str]:
    """`count` distinct adapters: the template's tensors perturbed, same config."""
    config, tensors = read_adapter_config(template), read_adapter_tensors(template)
    names = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        varied = {k: t + 0.05 * torch.randn(t.shape, generator=gen) for k, t in tensors.items()}
        out = write_adapter_dir(work / f"a{i}", config, varied)
        names.append(hub.publish(out, f"t{i % 50}/task{i}").name)
    return names


async def load(
    url: str, adapters: list[str], texts: list[str], concurrency: int, requests: int, seconds: float
) -> dict:
    latencies, errors, sent = [], 0, 0
    deadline = time.monotonic() + seconds
    rng = random.Random(0)

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal errors, sent
        while sent < requests and time.monotonic() < deadline:
            sent += 1
            body = {"adapter": rng.choice(adapters), "inputs": [rng.choice(texts)]}
            start = time.perf_counter()
            response = await http.post(url, json=body)
            latencies.append(time.perf_counter() - start)
            errors += response.status_code != 200

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"requests": len(latencies), "req_per_s": len(latencies) / elapsed, "errors": errors,
            "p50_ms": 1e3 * statistics.median(latencies),
            "p99_ms": 1e3 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}  # fmt: skip


def measure(system: str, url: str, names: list[str], points: list[int], texts: list[str], args) -> list[dict]:
    rows = []
    for n in points:
        adapters = names[:n]
        asyncio.run(load(url, adapters, texts, args.concurrency, min(len(adapters), 200) + 20, 120))  # warm-up
        result = asyncio.run(load(url, adapters, texts, args.concurrency, args.requests, args.seconds))
        rows.append({"system": system, "adapters": n, **result})
        print(f"{system:<12} {n:>5} adapters: {result['req_per_s']:7.1f} req/s  p50 {result['p50_ms']:6.1f} ms  "
              f"p99 {result['p99_ms']:6.1f} ms  errors {result['errors']}", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, nargs="+", default=[1, 10, 100, 1000])
    parser.add_argument("--baseline-points", type=int, nargs="+", default=[1, 10, 100])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.points, args.baseline_points, args.requests, args.seconds = [1, 3], [1], 20, 20
    from ray import serve

    from benchmarks.multiplex_baseline import build
    from serving.launch import start, stop, wait_ready
    from tests.factories import random_adapter

    texts = [e.text for e in load_dataset(DataConfig()).test[:200]]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        hub = AdapterHub(str(work / "hub"))
        template = random_adapter(resolve_model_dir(MINILM), work / "template", "seq_cls", seed=0, scale=0.02)
        names = publish_adapters(hub, template, max(args.points + args.baseline_points), work)
        engine = EngineConfig(model=MINILM, hub=hub.url, device_slots=max(args.points) + 8)
        base = start({"/dcft": ServeConfig(engine=engine, max_batch_size=32, watch_interval_s=0)}, port=args.port)
        try:
            rows = measure("dcft-hub", f"{base}/dcft/v1/classify", names, args.points, texts, args)
            serve.run(build(hub.url), name="multiplex", route_prefix="/multiplex")
            wait_ready(f"{base}/dcft/healthz", 60)
            rows += measure("multiplexing", f"{base}/multiplex/v1/classify", names, args.baseline_points, texts, args)
        finally:
            stop()
    single = next(r["req_per_s"] for r in rows if r["system"] == "dcft-hub" and r["adapters"] == 1)
    baseline = {r["adapters"]: r["req_per_s"] for r in rows if r["system"] == "multiplexing"}
    for row in rows:
        row["vs_single"] = row["req_per_s"] / single
        row["vs_multiplex"] = row["req_per_s"] / baseline[row["adapters"]] if row["adapters"] in baseline else None
    notes = (f"MiniLM classification adapters (kernel 8), {args.concurrency} concurrent closed-loop clients on "
             f"127.0.0.1, up to {args.requests} requests or {args.seconds:g} s per point after a warm-up that "
             "touches the adapters; one review per request. Baseline: Ray Serve model multiplexing, one merged "
             "MiniLM per adapter, 8 per replica. Regenerate: `python -m benchmarks.serving`.")  # fmt: skip
    columns = ["system", "adapters", "req_per_s", "p50_ms", "p99_ms", "errors", "vs_single", "vs_multiplex"]
    kwargs = {"out_dir": args.out} if args.out else {}
    path = write_report("serving_smoke" if args.smoke else "serving", "Serving throughput over HTTP", rows, columns,
                        notes, **kwargs)  # fmt: skip
    print(f"report: {path}")


if __name__ == "__main__":
    main()
