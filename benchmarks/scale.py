"""Scale-out benchmark: 1 and 2 model replicas on a local multi-node Ray cluster, 1,000
adapters under uniform and Zipf traffic, with and without adapter-aware routing.

    python -m benchmarks.scale            # the report (about 15 minutes on 2 CPU cores)
    python -m benchmarks.scale --smoke    # a tiny BERT, 20 adapters, a few requests (tests)

The cluster (benchmarks/cluster.py) has a head holding the controller, the HTTP proxy and
the Ingress, and two worker nodes of one CPU each, so two model replicas sit on two nodes.
Each case deploys the app afresh (`num_replicas`, `routing.adapter_affinity`), warms it
with `--warmup` requests of the case's traffic, then measures `--requests` requests from a
closed loop of `--concurrency` clients. Hit rates are the bank's own counts, summed over
the replicas, from what every replica reports to the routers (`GET /v1/admin/status`),
taken just before and just after the measured requests:
device hit rate = device hits / (device hits + misses); host hit rate = the share of the
device misses found in host memory, 1 - registry fetches / device misses (a fetch from the
registry is a host-tier miss).

Each replica holds `--device-slots` adapters on its device and `--host-capacity` in host
memory, far fewer than the adapters in use, so where each adapter's requests go decides
the hit rates. Zipf traffic: adapter ranks drawn with probability ~ 1 / rank^s.

Target: with adapter-aware routing, the 2-replica device hit rate stays within 5 points of
the 1-replica rate under Zipf traffic. Absolute throughput and latency on a 2-core machine,
where clients, proxy, Ingress and both replicas share the CPUs, are indicative only.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from backbones.shipped import MINILM, resolve_model_dir
from benchmarks.cluster import LocalCluster
from benchmarks.harness import API_KEY, HOST, KERNEL, build_hub, free_port, review_texts
from benchmarks.report import RESULTS_DIR, write_report
from benchmarks.serving import LoadSpec, closed_loop
from serving.config import EngineConfig, RoutingConfig, ServeConfig

PREFIX = "/scale"
TARGET_POINTS = 5.0
COLUMNS = ["replicas", "routing", "traffic", "requests", "req_per_s", "p50_ms", "p99_ms", "errors",
           "device_hit_rate", "host_hit_rate", "device_misses", "registry_fetches"]


@dataclass(frozen=True)
class Case:
    replicas: int
    affinity: bool

    @property
    def routing(self) -> str:
        return "adapter-aware" if self.affinity else "power of two"


def cases(max_replicas: int) -> list[Case]:
    """One replica needs no routing; two replicas both ways."""
    return [Case(1, True)] + [Case(n, a) for n in range(2, max_replicas + 1) for a in (True, False)]


# --- traffic ----------------------------------------------------------------------------------


def traffic(kind: str, adapters: list[str], texts: list[str], count: int, seed: int, zipf_s: float) -> Iterator[dict]:
    rng = random.Random(seed)
    ranked = adapters[:]
    rng.shuffle(ranked)  # which adapters are hot is unrelated to their names
    weights = [1.0] * len(ranked) if kind == "uniform" else [1 / rank**zipf_s for rank in range(1, len(ranked) + 1)]
    cumulative = list(itertools.accumulate(weights))
    for _ in range(count):
        yield {"adapter": rng.choices(ranked, cum_weights=cumulative)[0], "inputs": [rng.choice(texts)]}


# --- the bank's counts, from every replica's report -------------------------------------------


def bank_totals(base: str) -> tuple[int, dict[str, float]]:
    status = httpx.get(f"{base}{PREFIX}/v1/admin/status", headers={"Authorization": f"Bearer {API_KEY}"},
                       timeout=60).raise_for_status().json()
    totals: dict[str, float] = {}
    for replica in status["replicas"]:
        for key, value in replica.get("bank", {}).items():
            totals[key] = totals.get(key, 0) + value
    return len(status["replicas"]), totals


def settled_totals(base: str, replicas: int, period_s: float, timeout_s: float = 60) -> dict[str, float]:
    """Counts once every replica has reported and two reports a stats period apart agree."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        seen, totals = bank_totals(base)
        if seen == replicas and totals == last:
            return totals
        last = totals
        time.sleep(2 * period_s)
    raise TimeoutError(f"the replicas' bank counts did not settle within {timeout_s:.0f} s")


def hit_rates(delta: dict[str, float]) -> tuple[float | None, float | None]:
    """(device hit rate, share of device misses served from host memory). The host tier is also
    asked for an adapter's task before its batch, so its own hit count counts some adapters twice;
    its misses are exactly the registry fetches."""
    hits, misses = delta.get("device_hit", 0), delta.get("device_miss", 0)
    device = hits / (hits + misses) if hits + misses else None
    host = max(0.0, 1 - delta.get("host_miss", 0) / misses) if misses else None
    return device, host


# --- one case ---------------------------------------------------------------------------------


def app_config(args: argparse.Namespace, model_dir: Path, hub_url: str, keys_file: Path, case: Case) -> ServeConfig:
    engine = EngineConfig(model=str(model_dir), hub=hub_url, kernel_size=KERNEL, device_slots=args.device_slots,
                          host_capacity=args.host_capacity)
    routing = RoutingConfig(adapter_affinity=case.affinity, stats_period_s=args.stats_period)
    return ServeConfig(engine=engine, routing=routing, num_replicas=case.replicas, replica_num_cpus=1,
                       max_batch_size=args.max_batch_size, api_keys_file=str(keys_file), watch_interval_s=0)


def measure(args: argparse.Namespace, base: str, case: Case, kind: str, names: list[str], texts: list[str]) -> dict:
    spec = LoadSpec(args.concurrency, args.requests, args.seconds, args.timeout)
    url = f"{base}{PREFIX}/v1/classify"
    seed = args.seed + (kind == "zipf")  # every case sees the same sequence per traffic kind
    warm = traffic(kind, names, texts, args.warmup, seed + 100, args.zipf_s)
    asyncio.run(closed_loop(url, warm, LoadSpec(args.concurrency, args.warmup, args.seconds, args.timeout)))
    before = settled_totals(base, case.replicas, args.stats_period)
    measured = asyncio.run(closed_loop(url, traffic(kind, names, texts, args.requests, seed, args.zipf_s), spec))
    after = settled_totals(base, case.replicas, args.stats_period)
    delta = {key: after.get(key, 0) - before.get(key, 0) for key in after}
    device, host = hit_rates(delta)
    row = {"replicas": case.replicas, "routing": case.routing, "traffic": kind, **measured.summary(),
           "device_hit_rate": device, "host_hit_rate": host, "device_hits": delta.get("device_hit", 0),
           "device_misses": delta.get("device_miss", 0), "registry_fetches": delta.get("host_miss", 0)}
    print(f"{case.replicas} replica(s) {case.routing:<14} {kind:<8} {row['req_per_s']:7.2f} req/s  "
          f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  device hits {fmt(row['device_hit_rate'])}  "
          f"host hits {fmt(row['host_hit_rate'])}  errors {row['errors']}", flush=True)
    return row


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


# --- report -----------------------------------------------------------------------------------


def verdict(rows: list[dict]) -> str:
    def device(replicas: int, routing: str) -> float | None:
        row = next((r for r in rows if (r["replicas"], r["routing"], r["traffic"]) == (replicas, routing, "zipf")),
                   None)
        return row and row["device_hit_rate"]

    one, aware, p2c = device(1, "adapter-aware"), device(2, "adapter-aware"), device(2, "power of two")
    if None in (one, aware, p2c):
        return "(a Zipf case is missing: the target is not evaluated)"
    gap = 100 * (one - aware)
    met = "met" if gap <= TARGET_POINTS else "missed"
    return (f"Zipf device hit rate: 1 replica {fmt(one)}; 2 replicas {fmt(aware)} with adapter-aware routing "
            f"({-gap:+.1f} points: target within {TARGET_POINTS:g} points below, {met}) and {fmt(p2c)} with "
            f"power of two choices ({100 * (p2c - one):+.1f} points)")


def notes(args: argparse.Namespace, summary: str) -> str:
    return (
        f"{summary}.\n\n"
        f"Ran on this machine's CPUs ({os.cpu_count()} cores), backbone `{args.model}` with real weights and "
        f"{args.adapters} distinct random classification adapters (kernel {KERNEL}), one real review per request. "
        f"A local Ray cluster on {HOST}: a head (controller, HTTP proxy, Ingress) and two one-CPU worker nodes; "
        f"model replicas ask one CPU each, so two replicas sit on two nodes. Per replica: device_slots "
        f"{args.device_slots}, host_capacity {args.host_capacity}, max_batch_size {args.max_batch_size}, routing "
        f"stats every {args.stats_period:g} s. Each case deploys afresh, warms with {args.warmup} requests of its "
        f"traffic, then measures {args.requests} requests (or {args.seconds:g} s) from {args.concurrency} "
        f"closed-loop clients; Zipf exponent {args.zipf_s:g}. Hit rates: the replicas' own bank counts over the "
        f"measured requests: each batch looks up each of its distinct adapters on the device once (a hit or a "
        f"miss); host hit rate = the share of device misses served from host memory rather than fetched from "
        f"the registry. "
        f"Throughput and latency share 2 cores with the clients and Ray: indicative only; "
        f"the claims are the hit rates and the errors. Regenerate: `python -m benchmarks.scale`."
    )


# --- main -------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MINILM, help="backbone alias or folder (tests use a tiny BERT)")
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--device-slots", type=int, default=64, help="per replica")
    parser.add_argument("--host-capacity", type=int, default=256, help="per replica")
    parser.add_argument("--replicas", type=int, default=2, help="most replicas (one per worker node)")
    parser.add_argument("--requests", type=int, default=1500, help="measured requests per case and traffic")
    parser.add_argument("--warmup", type=int, default=600, help="warm-up requests per case and traffic")
    parser.add_argument("--seconds", type=float, default=240, help="max seconds per measurement")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--zipf-s", type=float, default=1.0)
    parser.add_argument("--stats-period", type=float, default=0.5, help="routing stats period in s")
    parser.add_argument("--timeout", type=float, default=120, help="per-request timeout in s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny run for tests")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    args = parser.parse_args(argv)
    if args.smoke:
        args.adapters, args.device_slots, args.host_capacity = 20, 4, 8
        args.requests, args.warmup, args.concurrency, args.seconds = 40, 20, 4, 60
    return args


def run(args: argparse.Namespace, root: Path) -> list[dict]:
    os.environ["DCFT_HUB_CACHE"] = str(root / "cache")  # before Ray starts: every node inherits it
    os.environ["OMP_NUM_THREADS"] = "1"  # one torch thread per one-CPU replica
    model_dir = resolve_model_dir(args.model)
    hub, names = build_hub(root, model_dir, args.adapters)
    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps({API_KEY: "admin"}))
    texts = review_texts()
    rows = []
    with LocalCluster(workers=args.replicas) as cluster:
        port = free_port()
        for case in cases(args.replicas):
            base = cluster.serve({PREFIX: app_config(args, model_dir, hub.url, keys_file, case)}, port=port)
            rows += [measure(args, base, case, kind, names, texts) for kind in ("uniform", "zipf")]
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="dcft-bench-scale-") as tmp:
        rows = run(args, Path(tmp))
    summary = verdict(rows)
    name = "scale_smoke" if args.smoke else "scale"
    path = write_report(name, "Scale-out: replicas across nodes, with and without adapter-aware routing", rows,
                        COLUMNS, notes(args, summary), out_dir=args.out)
    print(summary)
    print(f"report: {path}")
    return rows


if __name__ == "__main__":
    main()
