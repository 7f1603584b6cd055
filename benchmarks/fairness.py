"""Tenant fairness: one tenant floods the Serve app, another's latency is measured.

    python -m benchmarks fairness            # real MiniLM, rotten-tomatoes reviews
    python -m benchmarks fairness --smoke    # tiny random BERT, a few seconds

Real HTTP on 127.0.0.1. The victim sends sequential classify requests (one at a
time), side by side in one run: alone; while a tenant with no concurrency quota floods
with `--flooders` closed-loop clients; and while a tenant under a quota (`--flood-limit`
requests in flight) floods the same way, once ignoring its 429s and once honouring
their Retry-After (as the openai client does). The flood runs in a process of its own.
Reported: the victim's p50/p99 latency, its ratio to the unloaded p50 (target: at most
2x under the quota), and how the flooder's requests were answered (200 / 429).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx

from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_bert_dir
from benchmarks.flood import flood
from benchmarks.harness import HOST, free_port, percentile, review_texts
from benchmarks.report import write_report
from serving.config import EngineConfig, LimitsConfig, ServeConfig, TenantQuota

KEYS = {"victim-key-0123456789abcd": "victim", "open-key-0123456789abcdef": "open",
        "limited-key-0123456789abc": "limited"}
KERNEL = 4  # divides the tiny BERT and MiniLM alike
TARGET_RATIO = 2.0


def serve(root: Path, model_dir: Path, flood_limit: int) -> str:
    from serving.launch import start

    hub = AdapterHub(str(root / "hub"))
    for seed, tenant in enumerate(KEYS.values()):
        hub.publish(random_adapter(model_dir, root / tenant, "seq_cls", seed=seed, kernel=KERNEL), f"{tenant}/reviews")
    keys = root / "keys.json"
    keys.write_text(json.dumps(KEYS))
    quotas = {"open": TenantQuota(max_concurrent=None), "limited": TenantQuota(max_concurrent=flood_limit)}
    config = ServeConfig(engine=EngineConfig(model=str(model_dir), hub=hub.url, kernel_size=KERNEL),
                         limits=LimitsConfig(tenant_quotas=quotas), api_keys_file=str(keys), watch_interval_s=0)
    return start({"/": config}, HOST, free_port(), timeout_s=300)


def classify(client: httpx.Client, base: str, tenant: str, text: str) -> tuple[int, float]:
    """(status, seconds) of one classify request by `tenant`."""
    key = next(k for k, t in KEYS.items() if t == tenant)
    start = time.perf_counter()
    answer = client.post(f"{base}/v1/classify", json={"adapter": f"{tenant}/reviews", "inputs": [text]},
                         headers={"Authorization": f"Bearer {key}"}, timeout=120)
    return answer.status_code, time.perf_counter() - start


def victim_latencies(base: str, texts: list[str], count: int) -> list[float]:
    with httpx.Client() as client:
        answers = [classify(client, base, "victim", texts[i % len(texts)]) for i in range(count)]
    assert all(status == 200 for status, _ in answers), answers
    return [seconds for _, seconds in answers]


def flooded(base: str, texts: list[str], count: int, flooder: str | None, clients: int, polite: bool) -> dict:
    """The victim's latencies while `clients` closed-loop clients of `flooder` send nonstop."""
    context = multiprocessing.get_context("spawn")
    started, stop, results = context.Event(), context.Event(), context.Queue()
    process = None
    if flooder:
        key = next(k for k, t in KEYS.items() if t == flooder)
        process = context.Process(target=flood, args=(base, flooder, key, clients, texts, polite, started, stop,
                                                      results))
        process.start()
        if not started.wait(timeout=120):  # the flood is answered before the victim is measured
            raise TimeoutError("the flooding process sent nothing within 120 s")
    try:
        latencies = victim_latencies(base, texts, count)
    finally:
        stop.set()
    statuses = results.get(timeout=300) if process else []
    if process:
        process.join(timeout=60)
    return {"latencies": latencies, "flood_200": statuses.count(200), "flood_429": statuses.count(429),
            "flood_other": len(statuses) - statuses.count(200) - statuses.count(429)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="victim requests per phase")
    parser.add_argument("--flooders", type=int, default=32, help="closed-loop clients of the flooding tenant")
    parser.add_argument("--flood-limit", type=int, default=4, help="the limited flooder's max_concurrent")
    parser.add_argument("--smoke", action="store_true", help="few requests (and a tiny random BERT by default)")
    parser.add_argument("--model", type=Path, default=None, help="backbone folder (default: MiniLM)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: benchmarks/results)")
    args = parser.parse_args(argv)
    from backbones.shipped import MINILM, resolve_model_dir
    from serving.launch import stop

    with TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = args.model or (tiny_bert_dir(root / "bert") if args.smoke else resolve_model_dir(MINILM))
        texts = ["a fine film", "dull", "the plot goes nowhere"] if args.smoke else review_texts()[:200]
        count, clients = (20, 8) if args.smoke else (args.requests, args.flooders)
        base = serve(root, model_dir, args.flood_limit)
        try:
            victim_latencies(base, texts, 5)  # warm-up: adapters resident, paths compiled
            limited = f"quota {args.flood_limit} in flight"
            phases = {"alone": flooded(base, texts, count, None, 0, False),
                      "flooded, no quota": flooded(base, texts, count, "open", clients, False),
                      f"flooded, {limited}, 429s ignored": flooded(base, texts, count, "limited", clients, False),
                      f"flooded, {limited}, Retry-After honoured": flooded(base, texts, count, "limited", clients,
                                                                           True)}
        finally:
            stop()
    rows = summarise(phases, "real MiniLM" if args.model is None and not args.smoke else f"{model_dir.name}", clients)
    for row in rows:
        print(row)
    notes = (f"CPU, {rows[0]['model']}, HTTP on 127.0.0.1, one model replica and one ingress. The victim sends "
             f"{count} sequential requests per phase; the flooder runs {clients} closed-loop clients. Target: the "
             f"victim's p50 under a flooding tenant with a quota at most {TARGET_RATIO:g}x its p50 alone.")
    kwargs = {"out_dir": args.out} if args.out else {}
    name = "fairness_smoke" if args.smoke else "fairness"
    path = write_report(name, "Tenant fairness under a flood", rows, list(rows[0]), notes, **kwargs)
    print(f"report: {path}")


def summarise(phases: dict[str, dict], model: str, clients: int) -> list[dict]:
    alone = percentile(phases["alone"]["latencies"], 50)
    rows = []
    for phase, result in phases.items():
        p50 = percentile(result["latencies"], 50)
        rows.append({"phase": phase, "model": model, "flooding_clients": clients if phase != "alone" else 0,
                     "victim_p50_ms": round(p50 * 1000, 1),
                     "victim_p99_ms": round(percentile(result["latencies"], 99) * 1000, 1),
                     "p50_vs_alone": round(p50 / alone, 2), "flood_200": result["flood_200"],
                     "flood_429": result["flood_429"], "flood_other": result["flood_other"]})
    return rows


if __name__ == "__main__":
    main()
