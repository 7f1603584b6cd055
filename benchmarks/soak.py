"""Bounded soak of the Ray Serve app on 127.0.0.1: many adapters of mixed tasks, a hot swap
every few seconds, every answer checked against the adapter run alone, replica memory sampled.

    python -m benchmarks.soak            # 10 minutes on the real MiniLM (the recorded run)
    python -m benchmarks.soak --smoke    # 20 s on a tiny random BERT (the test suite)

Adapters: `--adapters` names split over three tasks (2-label and 3-label classification,
regression). Traffic: a closed loop of `--concurrency` clients, each request one real review
for a random adapter. Swaps: every `--swap-every` s a new version of a random adapter is
published; the registry watcher picks it up while traffic runs. Checks, after the run: each
answer names the version it ran on; it must match that version run alone in this process
(same label, scores and values within 1e-4). Failed = any answer other than 200.
Memory: RSS of the model replica, sampled every few seconds after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from adapters.store.files import read_adapter_config, read_adapter_tensors
from adapters.store.hub import AdapterHub
from backbones.shipped import MINILM, resolve_model_dir
from benchmarks.harness import API_KEY, HOST, free_port, publish_variant, review_texts
from benchmarks.report import RESULTS_DIR, write_report
from serving.config import EngineConfig, ServeConfig

KERNEL = 4  # divides the tiny test BERT and MiniLM alike
TASKS = [("seq_cls", ("rotten", "fresh")), ("seq_cls", ("low", "mid", "high")), ("regression", ())]
TOLERANCE = 1e-4


@dataclass
class Answer:
    adapter: str
    text: str
    status: int
    body: dict
    latency_s: float


@dataclass
class Soak:
    answers: list[Answer] = field(default_factory=list)
    swaps: int = 0
    rss_mib: list[float] = field(default_factory=list)


# --- the hub -----------------------------------------------------------------------------


class Publisher:
    """Publishes noisy variants of one template per task: distinct adapters and new versions."""

    def __init__(self, model_dir: Path, root: Path):
        from benchmarks.fixtures import random_adapter

        self.hub, self.work = AdapterHub(str(root / "hub")), root / "variants"
        self.templates = []
        for i, (task, labels) in enumerate(TASKS):
            folder = random_adapter(model_dir, root / f"template{i}", task, seed=i, labels=labels or ("a", "b"),
                                    kernel=KERNEL)
            self.templates.append((read_adapter_config(folder), read_adapter_tensors(folder)))

    def publish(self, name: str, seed: int) -> int:
        config, tensors = self.templates[int(name[len("tenant") :].split("/")[0]) % len(TASKS)]
        return publish_variant(self.hub, config, tensors, seed, self.work, name).version


def adapter_names(count: int) -> list[str]:
    return [f"tenant{i:03d}/{'sentiment' if i % 3 == 0 else 'topic' if i % 3 == 1 else 'score'}" for i in range(count)]


# --- traffic, swaps, memory -------------------------------------------------------------


async def traffic(url: str, names: list[str], texts: list[str], seconds: float, concurrency: int, seed: int,
                  soak: Soak) -> None:
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {API_KEY}"}

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            name, text = rng.choice(names), rng.choice(texts)
            start = time.perf_counter()
            try:
                response = await http.post(url, json={"adapter": name, "inputs": [text]})
                status, body = response.status_code, response.json()
            except httpx.HTTPError as err:
                status, body = 0, {"error": {"type": type(err).__name__}}
            soak.answers.append(Answer(name, text, status, body, time.perf_counter() - start))

    async with httpx.AsyncClient(timeout=120, headers=headers) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))


def swap_loop(publisher: Publisher, names: list[str], every_s: float, stop: threading.Event, soak: Soak) -> None:
    rng, seed = random.Random(1), 10_000
    while not stop.wait(every_s):
        seed += 1
        publisher.publish(rng.choice(names), seed)
        soak.swaps += 1


def replica_processes(app_name: str) -> list[psutil.Process]:
    marker = f"{app_name}#AdapterModel"
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "ServeReplica" in cmdline and marker in cmdline.replace(":", "#"):
            found.append(proc)
    return found


def memory_loop(app_name: str, every_s: float, stop: threading.Event, soak: Soak) -> None:
    while True:
        procs = replica_processes(app_name)
        soak.rss_mib.append(sum(p.memory_info().rss for p in procs) / 2**20 if procs else float("nan"))
        if stop.wait(every_s):
            return


# --- checking ----------------------------------------------------------------------------


def check_answers(answers: list[Answer], model: str, hub_url: str) -> Counter[str]:
    """Every 200 answer against its adapter version run alone: one batch per version, holding
    only that adapter's rows (so nothing else is mixed in), over the texts it was asked."""
    from serving.engine import Engine

    engine = Engine(EngineConfig(model=model, hub=hub_url, kernel_size=KERNEL, device_slots=8, host_capacity=64))
    asked: dict[tuple[str, int], set[str]] = {}
    for answer in answers:
        if answer.status == 200:
            asked.setdefault((answer.adapter, answer.body["version"]), set()).add(answer.text)
    reference = {}
    for (adapter, version), texts in asked.items():
        digest = engine.resolve(f"{adapter}@{version}")
        ordered = sorted(texts)
        predictions = engine.classify([engine.encode_classify(text, None, digest) for text in ordered])
        reference |= {(adapter, version, text): p for text, p in zip(ordered, predictions, strict=True)}
    verdicts: Counter[str] = Counter()
    for answer in answers:
        if answer.status != 200:
            verdicts[f"HTTP {answer.status}"] += 1
            continue
        want = reference[(answer.adapter, answer.body["version"], answer.text)]
        verdicts["right" if same_prediction(answer.body["results"][0], want) else "wrong"] += 1
    return verdicts


def same_prediction(got: dict, want) -> bool:
    if want.value is not None:
        return abs(got["value"] - want.value) <= TOLERANCE * max(1.0, abs(want.value))
    return got["label"] == want.label and all(abs(got["scores"][k] - v) <= TOLERANCE for k, v in want.scores.items())


# --- the run -----------------------------------------------------------------------------


def serve_config(model_dir: Path, publisher: Publisher, adapters: int, root: Path) -> ServeConfig:
    keys = root / "keys.json"
    keys.write_text(json.dumps({API_KEY: "admin"}))
    engine = EngineConfig(model=str(model_dir), hub=publisher.hub.url, kernel_size=KERNEL, device_slots=2 * adapters)
    return ServeConfig(engine=engine, api_keys_file=str(keys), watch_interval_s=1.0, max_batch_size=16)


def drive(args: argparse.Namespace, config: ServeConfig, publisher: Publisher, names: list[str],
          texts: list[str]) -> tuple[Soak, Soak, float]:
    """Start the app, warm it up, then traffic + swaps + memory samples; stop the app."""
    from serving.launch import start, stop

    soak, warm, done = Soak(), Soak(), threading.Event()
    base = start({"/soak": config}, host=HOST, port=free_port(), timeout_s=300, names={"/soak": "soak"})
    try:
        url = f"{base}/soak/v1/classify"
        asyncio.run(traffic(url, names, texts, args.warmup, args.concurrency, args.seed + 1, warm))
        threads = [
            threading.Thread(target=swap_loop, args=(publisher, names, args.swap_every, done, soak)),
            threading.Thread(target=memory_loop, args=("soak", args.memory_every, done, soak)),
        ]
        for thread in threads:
            thread.start()
        started = time.perf_counter()
        asyncio.run(traffic(url, names, texts, args.seconds, args.concurrency, args.seed, soak))
        elapsed = time.perf_counter() - started
        done.set()
        for thread in threads:
            thread.join()
    finally:
        done.set()
        stop()
    return soak, warm, elapsed


def run(args: argparse.Namespace) -> dict:
    model_dir = resolve_model_dir(args.model)
    texts, names = review_texts()[: args.texts], adapter_names(args.adapters)
    with tempfile.TemporaryDirectory() as tmp:
        publisher = Publisher(model_dir, Path(tmp))
        for i, name in enumerate(names):
            publisher.publish(name, seed=i)
        config = serve_config(model_dir, publisher, args.adapters, Path(tmp))
        soak, warm, elapsed = drive(args, config, publisher, names, texts)
        verdicts = check_answers(soak.answers, str(model_dir), publisher.hub.url)
    return summarise(soak, verdicts, elapsed, warm)


def summarise(soak: Soak, verdicts: Counter[str], elapsed: float, warm: Soak) -> dict:
    ok = [a.latency_s * 1000 for a in soak.answers if a.status == 200]
    versions = Counter((a.adapter, a.body["version"]) for a in soak.answers if a.status == 200)
    rss = [r for r in soak.rss_mib if r == r]  # NaN: replica not found at that sample
    return {
        "seconds": round(elapsed, 1),
        "requests": len(soak.answers),
        "req_per_s": len(soak.answers) / elapsed,
        "right": verdicts["right"],
        "wrong": verdicts["wrong"],
        "failed": sum(n for k, n in verdicts.items() if k.startswith("HTTP")),
        "failures": {k: n for k, n in verdicts.items() if k.startswith("HTTP")},
        "warmup_failed": sum(a.status != 200 for a in warm.answers),
        "swaps_published": soak.swaps,
        "adapter_versions_served": len(versions),
        "p50_ms": statistics.median(ok) if ok else None,
        "p99_ms": statistics.quantiles(ok, n=100)[98] if len(ok) > 1 else None,
        "rss_start_mib": rss[0] if rss else None,
        "rss_end_mib": rss[-1] if rss else None,
        "rss_max_mib": max(rss) if rss else None,
        "rss_samples_mib": [round(r, 1) for r in rss],
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MINILM, help="backbone alias or folder")
    parser.add_argument("--adapters", type=int, default=60)
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--warmup", type=float, default=30, help="seconds of traffic before measuring")
    parser.add_argument("--swap-every", type=float, default=3.0)
    parser.add_argument("--memory-every", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--texts", type=int, default=64, help="distinct reviews drawn from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny BERT, 20 s (needs --model)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.smoke:
        args.adapters, args.seconds, args.warmup, args.swap_every, args.memory_every = 9, 10, 2, 1.5, 2
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    row = run(args)
    flat = "" if row["rss_start_mib"] is None else (
        f" Replica RSS {row['rss_start_mib']:.0f} MiB after warm-up, {row['rss_end_mib']:.0f} MiB at the end "
        f"(max {row['rss_max_mib']:.0f})."
    )
    notes = (
        f"{args.adapters} adapters (a third each: 2-label and 3-label classification, regression) on `{args.model}`, "
        f"{args.concurrency} closed-loop clients for {args.seconds:g} s after {args.warmup:g} s of warm-up, "
        f"a new version of a random adapter published every {args.swap_every:g} s (watcher polls every 1 s). "
        f"Every answer checked against its version run alone (tolerance {TOLERANCE}).{flat} "
        f"Regenerate: `python -m benchmarks.soak`."
    )
    name = "soak_smoke" if args.smoke else "soak"
    columns = ["seconds", "requests", "req_per_s", "right", "wrong", "failed", "swaps_published",
               "adapter_versions_served", "p50_ms", "p99_ms", "rss_start_mib", "rss_end_mib",
               "rss_max_mib"]
    path = write_report(name, "Soak: mixed tasks, hot swaps, answers checked", [row], columns, notes, out_dir=args.out)
    print(path.read_text())
    return row


if __name__ == "__main__":
    main()
