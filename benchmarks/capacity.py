"""Capacity: bytes per adapter on disk and in host memory, and 100,000 adapters resident in one
serving engine with requests still answered.

    python -m benchmarks.capacity                  # real MiniLM, 100,000 adapters (~40 min on 2 CPU cores)
    python -m benchmarks.capacity --count 10000    # a shorter engine run
    python -m benchmarks.capacity --smoke          # tiny random BERT, 50 adapters, seconds (the test suite)

Resident bytes are measured, not computed: a fresh (spawned) process loads `--rss-adapters`
adapters into an `AdapterBank` host tier per dtype and reports its RSS growth per adapter,
next to the adapters' tensor bytes. A 2 GiB tier holds 2 GiB / (RSS per adapter).

The engine run publishes `--count` distinct kernel-8 classification adapters (one template
plus seeded noise, as benchmarks.serving does) to a hub on local disk, loads every one through
`ModelService.load` (registry fetch and digest check, validation, a device slot, then the host
tier as the device LRU evicts it), and then serves `--requests` single-review classification
requests, one at a time, for random adapters among them. Each answer is checked (a label of the
adapter, probabilities summing to 1) and the first is compared with a fresh engine serving only
that adapter.

Target: 100,000 resident adapters (host tier) on a 24 GiB machine, requests still answered.
"""

from __future__ import annotations

import argparse
import functools
import gc
import math
import multiprocessing
import os
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

from adapters.store.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config
from adapters.store.hub import AdapterHub
from backbones.shipped import MINILM, resolve_model_dir
from benchmarks.harness import KERNEL, LABELS, AdapterFolders, build_hub, percentile
from benchmarks.report import RESULTS_DIR, write_report
from serving.calls import ClassifyCall, ClassifyResult
from serving.config import EngineConfig
from serving.model import build_serving_model
from serving.service import ModelService

TIER_BYTES = 2 << 30  # the host-memory tier the question asks about: 2 GiB
TARGET_COUNT = 100_000
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DTYPE_LABELS = {"float32": "fp32", "bfloat16": "bf16"}
TEXTS = ["a gripping and funny film with a great cast", "dull, overlong and badly written", "superb acting"]
COLUMNS = ["measure", "dtype", "adapters", "bytes_per_adapter", "adapters_per_2GiB"]


def rss_bytes() -> int:
    """Resident set size of this process (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def per_tier(bytes_per_adapter: float) -> int | None:
    """Adapters a 2 GiB tier holds; None when a small run's RSS did not grow (freed memory reused)."""
    return int(TIER_BYTES // bytes_per_adapter) if bytes_per_adapter > 0 else None


# --- bytes per adapter --------------------------------------------------------------------------


def disk_row(template: Path) -> dict:
    size = (template / WEIGHTS_NAME).stat().st_size + (template / CONFIG_NAME).stat().st_size
    return {"measure": "on disk: safetensors + config", "dtype": "fp32", "adapters": 1, "bytes_per_adapter": size,
            "adapters_per_2GiB": per_tier(size)}


def measure_host_tier(model: str, template: str, count: int) -> list[dict]:
    """Load `count` adapters (distinct keys, the template's bytes) into a host tier per dtype.

    Runs in a fresh process: memory another phase freed would hide the growth. Every bank
    stays alive until the end, so one dtype's freed memory never serves the next.
    """
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    kernel = read_adapter_config(template).kernel_size
    rows, banks = [], []
    for label, dtype in DTYPES.items():
        config = EngineConfig(model=model, kernel_size=kernel, device_slots=1, host_capacity=count + 1)
        folders = functools.partial(AdapterFolders, template=Path(template))
        served = build_serving_model(resolve_model_dir(model), config, folders, torch.device("cpu"), dtype)
        bank, loader = served.placement, served.source.load
        bank.load("warm-up")  # first-call allocations are not per adapter
        gc.collect()
        before = rss_bytes()
        for i in range(count):
            bank.load(f"{label}-{i}")
        gc.collect()
        grown = (rss_bytes() - before) / count
        tensor_bytes = loader("probe").to(dtype).nbytes  # what the bank keeps: the file's fp32 in its dtype
        rows.append({"measure": "host tier: tensor bytes", "dtype": label, "adapters": 1,
                     "bytes_per_adapter": tensor_bytes, "adapters_per_2GiB": per_tier(tensor_bytes)})
        rows.append({"measure": "host tier: RSS growth", "dtype": label, "adapters": count,
                     "bytes_per_adapter": round(grown), "adapters_per_2GiB": per_tier(grown)})
        banks.append(bank)
    return rows


# --- the engine run -----------------------------------------------------------------------------


def load_all(service: ModelService, names: list[str]) -> float:
    """Every adapter through the serving path; returns seconds. Progress every tenth."""
    started = time.perf_counter()
    step = max(1, len(names) // 10)
    for i, name in enumerate(names, 1):
        service.load(name)
        if i % step == 0:
            print(f"  loaded {i:,} in {time.perf_counter() - started:.0f} s, RSS {rss_bytes() / 2**30:.2f} GiB",
                  flush=True)
    return time.perf_counter() - started


def answered(result: object) -> bool:
    """A classification answer from this adapter: one of its labels, probabilities summing to 1."""
    if not isinstance(result, ClassifyResult) or len(result.predictions) != 1:
        return False
    prediction = result.predictions[0]
    return prediction.label in LABELS and math.isclose(sum(prediction.scores.values()), 1.0, rel_tol=1e-4)


def serve_random(service: ModelService, names: list[str], requests: int, seed: int) -> tuple[list[float], list]:
    """One request at a time for random adapters; returns (seconds per request, results)."""
    rng = random.Random(seed)
    latencies, results = [], []
    for _ in range(requests):
        call = ClassifyCall(rng.choice(names), ((rng.choice(TEXTS), None),))
        start = time.perf_counter()
        results.append(service.classify_many([call])[0])
        latencies.append(time.perf_counter() - start)
    return latencies, results


def same_as_alone(hub: AdapterHub, config: EngineConfig, call: ClassifyCall, served: ClassifyResult) -> bool:
    """The answer served among many residents equals a fresh engine's holding only that adapter."""
    alone = ModelService(config.model_copy(update={"device_slots": 1, "host_capacity": 1}), hub=hub)
    return alone.classify_many([call])[0].predictions == served.predictions


def engine_run(root: Path, model: str, count: int, requests: int, dtype: str, slots: int, seed: int) -> dict:
    model_dir = resolve_model_dir(model)
    started = time.perf_counter()
    built, names = build_hub(root, model_dir, count)
    hub = AdapterHub(built.url, cache_dir=root / "cache")  # fetched copies stay in the work folder
    publish_s = time.perf_counter() - started
    print(f"published {count:,} adapters in {publish_s:.0f} s", flush=True)
    config = EngineConfig(model=str(model_dir), hub=hub.url, device_slots=slots, host_capacity=count, dtype=dtype)
    service = ModelService(config, hub=hub)
    gc.collect()
    before = rss_bytes()
    load_s = load_all(service, names)
    gc.collect()
    after = rss_bytes()
    resident = service.status()["resident"]
    latencies, results = serve_random(service, names, requests, seed)
    check = ClassifyCall(names[0], ((TEXTS[0], None),))  # long evicted from the device: served from the host tier
    grown = (after - before) / count
    return {
        "measure": "engine: ModelService host tier, RSS growth (with catalog)", "dtype": DTYPE_LABELS[dtype],
        "adapters": resident["host"], "bytes_per_adapter": round(grown), "adapters_per_2GiB": per_tier(grown),
        "publish_s": round(publish_s, 1), "load_s": round(load_s, 1), "load_ms_per_adapter": 1e3 * load_s / count,
        "rss_before_gib": before / 2**30, "rss_after_gib": after / 2**30, "device_resident": resident["device"],
        "requests": requests, "answered": sum(map(answered, results)),
        "request_p50_ms": 1e3 * percentile(latencies, 50), "request_p99_ms": 1e3 * percentile(latencies, 99),
        "same_as_alone": same_as_alone(hub, config, check, service.classify_many([check])[0]),
    }


# --- report -------------------------------------------------------------------------------------


def notes(run: dict, args: argparse.Namespace) -> str:
    verdict = "met" if run["adapters"] >= TARGET_COUNT and run["answered"] == run["requests"] else "not met"
    return (
        f"Backbone `{args.model}`, kernel-8 classification adapters (DCFT on every attention and FFN layer plus a "
        f"2-label head). `bytes_per_adapter` of the host tier: tensor bytes, and the measured RSS growth over "
        f"{args.rss_adapters:,} adapters loaded into an `AdapterBank` in a fresh process (per dtype). "
        f"`adapters_per_2GiB` = 2 GiB / bytes_per_adapter. The host tier keeps each adapter as one flat buffer in "
        f"the bank's dtype (`serving/bank.py` `HostAdapter`); before that change (about 110 separate tensors per "
        f"adapter, kept in the file's fp32) the same measurement gave 164 KB per MiniLM adapter at either dtype "
        f"(5,000 adapters: about 13,000 per 2 GiB).\n\n"
        f"Engine run: {run['adapters']:,} distinct adapters resident in the host tier ({run['device_resident']} on "
        f"the device) of one `ModelService` ({run['dtype']}); published in {run['publish_s']:,} s, loaded through "
        f"`ModelService.load` in {run['load_s']:,} s ({run['load_ms_per_adapter']:.2f} ms each, registry fetch "
        f"included); RSS {run['rss_before_gib']:.2f} -> {run['rss_after_gib']:.2f} GiB. Then {run['requests']} "
        f"single-review requests for random residents, one at a time: {run['answered']} answered, p50 "
        f"{run['request_p50_ms']:.1f} ms, p99 {run['request_p99_ms']:.1f} ms (nearest rank); a host-tier answer "
        f"equals a fresh engine's holding only that adapter: {run['same_as_alone']}.\n\n"
        f"Target: {TARGET_COUNT:,} resident adapters with requests still served: **{verdict}** (this run: "
        f"{run['adapters']:,}).\n\nRegenerate: `python -m benchmarks.capacity` (`--count N` for a shorter run)."
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=TARGET_COUNT, help="adapters resident in the engine run")
    parser.add_argument("--rss-adapters", type=int, default=10_000, help="adapters per dtype for the RSS growth")
    parser.add_argument("--requests", type=int, default=50, help="requests served after loading")
    parser.add_argument("--device-slots", type=int, default=EngineConfig().device_slots, help="the engine's")
    parser.add_argument("--dtype", choices=sorted(DTYPE_LABELS), default="float32", help="the engine run's dtype")
    parser.add_argument("--model", default=None, help="backbone alias or folder (default minilm; smoke: tiny BERT)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny random BERT, 50 adapters: for tests")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    args = parser.parse_args(argv)
    if args.smoke:
        args.count, args.rss_adapters, args.requests, args.device_slots = 50, 50, 3, 8
    return args


def template_adapter(root: Path, args: argparse.Namespace) -> Path:
    """The adapter build_hub varies (same seed, labels, kernel), for the per-adapter measurements."""
    from benchmarks.fixtures import random_adapter, tiny_bert_dir

    if args.model is None:
        args.model = str(tiny_bert_dir(root / "tiny-bert")) if args.smoke else MINILM
    return random_adapter(resolve_model_dir(args.model), root / "adapter", "seq_cls", 0, LABELS, KERNEL)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="dcft-bench-capacity-") as tmp, ProcessPoolExecutor(1, spawn) as pool:
        root = Path(tmp)
        template = template_adapter(root, args)
        # beside the engine run, in its own process (it may slow the run's publishing a little)
        host_tier = pool.submit(measure_host_tier, args.model, str(template), args.rss_adapters)
        run = engine_run(root, args.model, args.count, args.requests, args.dtype, args.device_slots, args.seed)
        rows = [disk_row(template), *host_tier.result(), run]
        name = "capacity_smoke" if args.smoke else "capacity"  # written before ~1M work files are removed
        path = write_report(name, "Capacity: adapters per byte, and 100,000 resident", rows, COLUMNS,
                            notes(run, args), out_dir=args.out)
    print(notes(run, args))
    print(f"report: {path}")
    return rows


if __name__ == "__main__":
    main()
