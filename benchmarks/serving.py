"""HTTP serving benchmark on 127.0.0.1: dcft-hub with 1, 10, 100 and 1,000 distinct adapters
under uniform traffic, against the same app with one adapter (N = 1) and against what a Ray
Serve user would build without dcft-hub, Ray's model multiplexing (benchmarks/multiplex_baseline.py).

    python -m benchmarks.serving            # the report (about 10 minutes on 2 CPU cores)
    python -m benchmarks.serving --smoke    # 1 and 3 adapters, 20 requests per point

Both apps run at once in one Ray session, behind one Serve HTTP proxy, and are measured
side by side at each N, so every ratio comes from one run.

Load: a closed loop of `--concurrency` clients (asyncio + httpx). Each request names an adapter
drawn uniformly from the point's N and carries one real review (rotten-tomatoes test split);
both systems get the same request sequence. A point stops issuing requests after `--requests`
requests or `--seconds` s, whichever comes first; requests in flight then finish and count.
req/s = successful responses / wall time of the point; p50/p99 over successful responses.
Before each point a warm-up sends one request to every adapter the system can keep warm (and
at least 2 x concurrency requests, so full batches have run): all N for dcft-hub (device_slots
>= N), the first min(N, K) for the baseline, whose LRU holds K models (beyond K its steady
state is the cold path; warming more would only be evicted). Its duration is warmup_s.

Targets at N = 100: dcft-hub >= 0.8x its single-adapter throughput and >= 3x the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from adapters.store.hub import AdapterHub
from backbones.shipped import MINILM, resolve_model_dir
from benchmarks.harness import API_KEY, HOST, KERNEL, LABELS, build_hub, free_port, percentile, review_texts
from benchmarks.report import RESULTS_DIR, write_report
from serving.config import EngineConfig, ServeConfig

TARGET_N, TARGET_VS_SINGLE, TARGET_VS_MULTIPLEX = 100, 0.8, 3.0
COLUMNS = ["system", "adapters", "requests", "req_per_s", "p50_ms", "p99_ms", "errors", "ratio_vs_single",
           "ratio_vs_multiplex", "warmup_s"]


@dataclass(frozen=True)
class System:
    name: str  # as reported
    app: str  # Serve application name
    route: str  # route prefix on the shared HTTP proxy
    warm_capacity: int  # adapters it can keep warm at once


@dataclass(frozen=True)
class LoadSpec:
    concurrency: int
    max_requests: int
    max_seconds: float
    timeout_s: float  # per request; a timeout counts as an error


@dataclass
class Measurement:
    latencies_s: list[float]  # successful requests only
    errors: Counter[str]  # HTTP status or exception name -> count
    elapsed_s: float

    def summary(self) -> dict:
        ok, failed = len(self.latencies_s), sum(self.errors.values())
        return {
            "requests": ok + failed,
            "req_per_s": ok / self.elapsed_s if self.elapsed_s > 0 else 0.0,
            "p50_ms": 1e3 * percentile(self.latencies_s, 50),
            "p99_ms": 1e3 * percentile(self.latencies_s, 99),
            "errors": failed,
        }


# --- the adapters -----------------------------------------------------------------------------


def adapter_name(index: int) -> str:
    return f"tenant{index:04d}/sentiment"  # one tenant each: many tenants' tasks, as in production


# --- the systems ------------------------------------------------------------------------------


def dcft_config(model: str, hub_url: str, adapters: int, keys_file: Path, args: argparse.Namespace) -> ServeConfig:
    engine = EngineConfig(model=model, hub=hub_url, kernel_size=KERNEL, device_slots=adapters,
                          host_capacity=max(adapters, EngineConfig().host_capacity))
    return ServeConfig(engine=engine, max_batch_size=args.max_batch_size, api_keys_file=str(keys_file),
                       watch_interval_s=args.watch_interval)


def start_systems(args: argparse.Namespace, model_dir: Path, hub: AdapterHub, adapters: int, root: Path,
                  systems: list[System]) -> str:
    """Both apps on one Serve instance (ours through serving.launch, as `dcft serve` starts it)."""
    from ray import serve

    from benchmarks.multiplex_baseline import build_multiplex_app
    from serving.launch import start, wait_ready

    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps({API_KEY: "admin"}))
    ours, baseline = systems
    config = dcft_config(args.model, hub.url, adapters, keys_file, args)
    base = start({ours.route: config}, host=HOST, port=args.port or free_port(), timeout_s=args.start_timeout)
    app = build_multiplex_app(str(model_dir), hub.url, args.models_per_replica, args.max_batch_size,
                              config.batch_wait_timeout_s, config.limits.max_queued_requests)
    serve.run(app, name=baseline.app, route_prefix=baseline.route)
    wait_ready(f"{base}{baseline.route}/readyz", args.start_timeout)
    return base


def stop_systems() -> None:
    """serve.shutdown deletes every app (ours and the baseline), then Ray goes down."""
    import ray

    from serving.launch import stop

    if ray.is_initialized():
        stop()


def uniform_bodies(adapters: list[str], texts: list[str], count: int, seed: int) -> Iterator[dict]:
    rng = random.Random(seed)
    for _ in range(count):
        yield {"adapter": rng.choice(adapters), "inputs": [rng.choice(texts)]}


def warmup_bodies(adapters: list[str], texts: list[str], count: int) -> Iterator[dict]:
    """Every adapter once, cycling on up to `count` requests so full batches run before timing too."""
    for i in range(max(count, len(adapters))):
        yield {"adapter": adapters[i % len(adapters)], "inputs": [texts[i % len(texts)]]}


async def closed_loop(url: str, bodies: Iterator[dict], spec: LoadSpec) -> Measurement:
    """`spec.concurrency` clients, each sending its next request as soon as its last one is answered."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    deadline = time.monotonic() + spec.max_seconds
    limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def client(http: httpx.AsyncClient) -> None:
        # One shared iterator: each body is sent once, by whichever client is free (asyncio: no races).
        for body in bodies:
            if time.monotonic() > deadline:
                return
            start = time.perf_counter()
            try:
                response = await http.post(url, json=body)
                failure = None if response.status_code == 200 else f"HTTP {response.status_code}"
            except httpx.HTTPError as err:
                failure = type(err).__name__
            if failure:
                errors[failure] += 1
            else:
                latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(timeout=spec.timeout_s, limits=limits, headers=headers) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(spec.concurrency)))
        return Measurement(latencies, errors, time.perf_counter() - start)


def measure_point(base: str, system: System, adapters: list[str], texts: list[str], spec: LoadSpec,
                  warmup_s: float, seed: int) -> dict:
    url = f"{base}{system.route}/v1/classify"
    warm = adapters[: system.warm_capacity]
    bodies = warmup_bodies(warm, texts, 2 * spec.concurrency)
    warmup = asyncio.run(closed_loop(url, bodies, replace(spec, max_seconds=warmup_s)))
    bodies = uniform_bodies(adapters, texts, spec.max_requests, seed)
    measured = asyncio.run(closed_loop(url, bodies, spec))
    row = {"system": system.name, "adapters": len(adapters), **measured.summary(),
           "warmup_s": warmup.elapsed_s, "warmup_adapters": len(warm),
           "warmup_errors": sum(warmup.errors.values())}
    failures = ", ".join(f"{kind} x{n}" for kind, n in (measured.errors + warmup.errors).items())
    print(f"{system.name:<22} N={len(adapters):<5} {row['req_per_s']:8.2f} req/s  p50 {row['p50_ms']:8.1f} ms  "
          f"p99 {row['p99_ms']:8.1f} ms  {row['requests']} requests in {measured.elapsed_s:.1f} s  "
          f"warm-up {warmup.elapsed_s:.1f} s{'  errors: ' + failures if failures else ''}", flush=True)
    return row


def measure_all(base: str, systems: list[System], names: list[str], texts: list[str], args: argparse.Namespace,
                spec: LoadSpec) -> list[dict]:
    """Every N for both systems, interleaved, so slow drift of a shared machine hits both alike."""
    rows = []
    for n in args.points:
        for system in systems:
            seed = args.seed + n  # both systems see the same request sequence at each N
            rows.append(measure_point(base, system, names[:n], texts, spec, args.warmup_seconds, seed))
    return rows


# --- report -----------------------------------------------------------------------------------


def ratio(a: float, b: float | None) -> float | None:
    return a / b if b else None


def add_ratios(rows: list[dict], ours: System, baseline: System) -> None:
    """ratio_vs_single: to the same system at N = 1; ratio_vs_multiplex (ours): to the baseline at the same N."""
    single = {r["system"]: r["req_per_s"] for r in rows if r["adapters"] == 1}
    multiplex = {r["adapters"]: r["req_per_s"] for r in rows if r["system"] == baseline.name}
    for row in rows:
        row["ratio_vs_single"] = ratio(row["req_per_s"], single.get(row["system"]))
        is_ours = row["system"] == ours.name
        row["ratio_vs_multiplex"] = ratio(row["req_per_s"], multiplex.get(row["adapters"])) if is_ours else None


def target_summary(rows: list[dict], ours: System) -> str:
    row = next((r for r in rows if r["system"] == ours.name and r["adapters"] == TARGET_N), None)
    if row is None:
        return f"(no N={TARGET_N} point: targets not evaluated)"
    fmt = lambda x: "n/a" if x is None else f"{x:.2f}x"  # noqa: E731
    return (f"N={TARGET_N}: dcft-hub at {fmt(row['ratio_vs_single'])} its single-adapter throughput "
            f"(target >= {TARGET_VS_SINGLE}x) and {fmt(row['ratio_vs_multiplex'])} the multiplexing baseline "
            f"(target >= {TARGET_VS_MULTIPLEX:g}x)")


def notes(args: argparse.Namespace, spec: LoadSpec, systems: list[System], summary: str) -> str:
    ours, baseline = systems
    return (
        f"{summary}.\n\n"
        f"Backbone `{args.model}`, classification adapters (kernel {KERNEL}, labels {'/'.join(LABELS)}), "
        f"one real review per request. Closed loop on {HOST}: {spec.concurrency} clients, at most "
        f"{spec.max_requests} requests or {spec.max_seconds:g} s per point (in-flight requests then finish); "
        f"requests/s = successful responses / wall time; p50/p99 over successful responses. Each point is "
        f"preceded by a warm-up touching every adapter the system can keep warm, and at least "
        f"{2 * spec.concurrency} requests (warmup_s): all N for "
        f"{ours.name}, min(N, K) for the baseline. Both apps run in one Ray session, one replica each, "
        f"measured alternately at each N with the same request sequence.\n\n"
        f"{ours.name}: mixed-adapter batches on one backbone, max_batch_size {args.max_batch_size}, "
        f"device_slots = largest N, registry watch interval {args.watch_interval:g} s, API key auth on.\n"
        f"{baseline.name}: Ray Serve `@serve.multiplexed(max_num_models_per_replica=K)`, K = "
        f"{args.models_per_replica}, one full backbone copy per adapter with the adapter merged into the "
        f"weights, `@serve.batch` (max {args.max_batch_size}; Serve splits batches per model id), routed by "
        f"`multiplexed_model_id`; no auth.\n\n"
        f"Torch threads per replica: {args.threads}. The load generator shares the machine's CPU with the "
        f"servers. Regenerate: `python -m benchmarks.serving`."
    )


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--points", type=int, nargs="+", default=[1, 10, 100, 1000], help="adapter counts N")
    parser.add_argument("--requests", type=int, default=600, help="max requests per point")
    parser.add_argument("--seconds", type=float, default=60, help="max seconds issuing requests per point")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--models-per-replica", type=int, default=8, help="K of the multiplexing baseline")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--model", default=MINILM, help="backbone alias or folder (tests use a tiny BERT)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count()),
                        help="torch threads in each replica (Ray's default for a 0-CPU actor is 1)")
    parser.add_argument("--watch-interval", type=float, default=ServeConfig().watch_interval_s,
                        help="dcft-hub's registry poll interval in s (0 = off)")
    parser.add_argument("--timeout", type=float, default=300, help="per-request timeout in s")
    parser.add_argument("--warmup-seconds", type=float, default=300, help="max seconds of warm-up per point")
    parser.add_argument("--start-timeout", type=float, default=300, help="max seconds for each app to start")
    parser.add_argument("--port", type=int, default=0, help="HTTP port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    args = parser.parse_args(argv)
    if args.smoke:
        args.points, args.requests, args.seconds, args.concurrency, args.models_per_replica = [1, 3], 20, 20, 4, 2
    return args


def run(args: argparse.Namespace, spec: LoadSpec, systems: list[System]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="dcft-bench-serving-") as tmp:
        root = Path(tmp)
        # Set before Ray starts, so every replica inherits them: a private adapter cache
        # (not ~/.cache) and the torch thread count (Ray gives a 0-CPU actor one thread).
        os.environ["DCFT_HUB_CACHE"] = str(root / "cache")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        model_dir = resolve_model_dir(args.model)
        started = time.perf_counter()
        hub, names = build_hub(root, model_dir, max(args.points))
        print(f"published {len(names)} adapters in {time.perf_counter() - started:.1f} s", flush=True)
        texts = review_texts()
        try:
            base = start_systems(args, model_dir, hub, max(args.points), root, systems)
            return measure_all(base, systems, names, texts, args, spec)
        finally:
            stop_systems()


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one bar per template load otherwise
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, throwaway cluster
    spec = LoadSpec(args.concurrency, args.requests, args.seconds, args.timeout)
    systems = [
        System("dcft-hub", "dcft", "/dcft", warm_capacity=max(args.points)),
        System(f"ray-multiplex (K={args.models_per_replica})", "multiplex", "/multiplex", args.models_per_replica),
    ]
    rows = run(args, spec, systems)
    add_ratios(rows, *systems)
    summary = target_summary(rows, systems[0])
    name = "serving_smoke" if args.smoke else "serving"
    path = write_report(name, "Serving over HTTP: many adapters vs one, vs Ray model multiplexing", rows, COLUMNS,
                        notes(args, spec, systems, summary), out_dir=args.out)
    print(summary)
    print(f"report: {path}")
    return rows


if __name__ == "__main__":
    main()
