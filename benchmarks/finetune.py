"""Fine-tuning as a service, timed: from upload to the first served token, a job's training against
`dcft train`, and serving while a job trains beside it.

    python -m benchmarks finetune            # real SmolLM2-135M and MiniLM weights
    python -m benchmarks finetune --smoke    # tiny random Llama and BERT, seconds per part

(a) **Upload to first token**: real HTTP on 127.0.0.1 to the Serve app (SmolLM2) with the fine-tuning
    scheduler beside it on the same local Ray cluster. The clock starts before `POST /v1/files` of a small
    chat file and stops at the first streamed token of a chat completion by the job's `fine_tuned_model`;
    the job's status is polled every 0.1 s to split the time into its stages.
(b) **Training overhead**: a job's task body (`run_job`: the files from the hub's store, events, a
    checkpoint per epoch, the publish) against what `dcft train` runs (`train_adapter`: the data from a
    CSV, the adapter saved to a folder), on the same MiniLM, the same reviews and the same settings, in
    this process with the same torch threads, interleaved rounds (the order flipped every round), paired
    within each round.
(c) **Serving beside a job**: a steady client (threads, each sending one chat completion after another,
    every answer exactly `--tokens` long: EOS is biased away) to the fine-tuned model, for `--window`
    seconds without a job, then with a job training on the same machine (measured from its first
    training step; cancelled after the window), rounds interleaved.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.harness import HOST, eos_ids, free_port, torch_threads
from benchmarks.report import RESULTS_DIR, markdown_table, write_report

TENANT, KEY = "bench", "bench-key-0123456789abcdef"
TERMINAL = ("succeeded", "failed", "cancelled")
COLUMNS = ["part", "variant", "round", "seconds", "vs_reference", "requests_per_s", "tokens_per_s", "errors",
           "job_steps"]
GREETINGS = ["Hi", "Hello there", "Good morning", "Hey", "Greetings", "Hi friend", "Howdy", "Good evening"]


@dataclass(frozen=True)
class Sizes:
    chats: int  # (a) and (c): the chat file's examples
    reviews: int  # (b): labelled reviews
    overhead_epochs: int
    overhead_rounds: int
    serve_rounds: int
    window_s: float
    clients: int
    tokens: int
    kernel: int


# --- data ---------------------------------------------------------------------------------------


def chat_file(count: int) -> bytes:
    """Chats that teach one reply: a handful of steps moves the loss."""
    lines = [{"messages": [{"role": "user", "content": GREETINGS[i % len(GREETINGS)] + "!" * (i // len(GREETINGS))},
                           {"role": "assistant", "content": "Bonjour! How can I help?"}]} for i in range(count)]
    return "\n".join(map(json.dumps, lines)).encode()


def labelled_reviews(count: int) -> list[tuple[str, str]]:
    """Real rotten-tomatoes reviews with their fresh/rotten labels."""
    from training.data import DataConfig, load_dataset

    splits = load_dataset(DataConfig())
    return [(example.text, splits.labels[example.label]) for example in splits.train[:count]]


# --- (b) a job's training against `dcft train` ----------------------------------------------------


def overhead(root: Path, model_dir: Path, sizes: Sizes, threads: int) -> list[dict]:
    """Seconds of `train_adapter` and of `run_job` on the same reviews and settings, interleaved."""
    reviews = labelled_reviews(sizes.reviews)
    runs = {"dcft train": train_runner(root, model_dir, reviews, sizes),
            "job": job_runner(root, model_dir, reviews, sizes)}
    rows = []
    with torch_threads(threads):
        for variant in runs:  # warm-up: imports, the kernel build, the file cache
            runs[variant](-1)
        for round_ in range(sizes.overhead_rounds):
            order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
            timed = {variant: timed_run(runs[variant], round_) for variant in order}
            for variant, (seconds, steps) in timed.items():
                rows.append({"part": "b", "variant": variant, "round": round_, "seconds": seconds, "job_steps": steps})
            rows[-2 if order[0] == "job" else -1]["vs_reference"] = timed["job"][0] / timed["dcft train"][0]
    return rows


def timed_run(run, round_: int) -> tuple[float, int]:
    """(seconds, training steps) of one run."""
    start = time.perf_counter()
    steps = run(round_)
    return time.perf_counter() - start, steps


def settings(sizes: Sizes) -> tuple[dict, dict]:
    """(OptimConfig fields, FineTuningConfig fields) that make both runs train alike: what a job sets."""
    optim = {"epochs": sizes.overhead_epochs, "batch_size": 16, "eval_batch_size": 32, "learning_rate": 2e-2,
             "gamma": 0.1, "logging_steps": 10, "max_length": 64, "seed": 0, "eval_every_epoch": False}
    return optim, {"events_every_steps": 10, "max_length": 64}


def train_runner(root: Path, model_dir: Path, reviews: list[tuple[str, str]], sizes: Sizes):
    from adapters.config import DCFTConfig
    from training.config import OptimConfig, TrainConfig
    from training.data import DataConfig
    from training.train import train_adapter

    table = root / "reviews.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows(reviews)
    optim, _ = settings(sizes)
    data = DataConfig(source=str(table), validation_fraction=0, test_fraction=0)

    def run(round_: int) -> int:
        config = TrainConfig(model=str(model_dir), data=data, dcft=DCFTConfig(kernel_size=sizes.kernel),
                             optim=OptimConfig(**optim), output_dir=root / f"train-{round_}", device="cpu")
        _, result = train_adapter(config)
        return max(entry.get("step", 0) for entry in result.history)

    return run


def job_runner(root: Path, model_dir: Path, reviews: list[tuple[str, str]], sizes: Sizes):
    from adapters.store.job_data import parse_training_file
    from adapters.store.job_records import (
        DCFTSettings,
        FileObject,
        FineTuningConfig,
        FineTuningJob,
        Hyperparameters,
        Method,
        new_id,
    )
    from adapters.store.jobs import JobStore
    from training.job_runner import run_job

    optim, limits = settings(sizes)
    config = FineTuningConfig(**limits)
    store = JobStore(str(root / "hub-overhead"))
    data = "\n".join(json.dumps({"text": text, "label": label}) for text, label in reviews).encode()
    parsed = parse_training_file(data, config)
    file = store.add_file(TENANT, FileObject(id=new_id("file"), bytes=len(data), filename="reviews.jsonl",
                                             format=parsed.format, examples=len(parsed.examples)), data)
    hyper = Hyperparameters(n_epochs=optim["epochs"], batch_size=optim["batch_size"])
    method = Method(dcft=DCFTSettings(kernel_size=sizes.kernel, learning_rate=optim["learning_rate"],
                                      gamma=optim["gamma"]))

    def run(round_: int) -> int:
        job = store.save_job(FineTuningJob(id=new_id("job"), model=str(model_dir), organization_id=TENANT,
                                           training_file=file.id, status="queued", hyperparameters=hyper,
                                           method=method, suffix="overhead"))
        status = run_job(store.url, str(model_dir), TENANT, job.id, 1, config, device="cpu")
        if status != "succeeded":
            raise RuntimeError(f"the overhead job ended {status}: {store.job(TENANT, job.id).error}")
        return max(e.data["step"] for e in store.events(TENANT, job.id) if e.data and "step" in e.data)

    return run


# --- the app: (a) and (c) -------------------------------------------------------------------------


class Api:
    """The tenant's view of the app over HTTP."""

    def __init__(self, base: str, backbone: str):
        self.base, self.backbone = base, backbone
        self.http = httpx.Client(base_url=f"{base}/v1", headers={"Authorization": f"Bearer {KEY}"}, timeout=300)

    def call(self, method: str, path: str, **kwargs) -> dict:
        response = self.http.request(method, path, **kwargs)
        response.raise_for_status()
        return response.json()

    def upload(self, data: bytes) -> str:
        return self.call("POST", "/files", files={"file": ("chats.jsonl", data)}, data={"purpose": "fine-tune"})["id"]

    def create(self, file_id: str, suffix: str, epochs: int, batch_size: int, kernel: int) -> dict:
        body = {"model": self.backbone, "training_file": file_id, "suffix": suffix,
                "hyperparameters": {"n_epochs": epochs, "batch_size": batch_size},
                "method": {"type": "dcft", "dcft": {"kernel_size": kernel}}}
        return self.call("POST", "/fine_tuning/jobs", json=body)

    def job(self, job_id: str) -> dict:
        return self.call("GET", f"/fine_tuning/jobs/{job_id}")

    def steps(self, job_id: str) -> int:
        """The last training step the job reported."""
        events = self.call("GET", f"/fine_tuning/jobs/{job_id}/events", params={"limit": 100})["data"]
        return max((e["data"]["step"] for e in events if e.get("data") and "step" in e["data"]), default=0)


def start_app(root: Path, model_dir: Path, sizes: Sizes) -> Api:
    from adapters.store.job_records import FineTuningConfig
    from backbones.loading import backbone_ref
    from serving.config import EngineConfig, ServeConfig
    from serving.launch import start
    from training.job_scheduler import deploy

    keys = root / "keys.json"
    keys.write_text(json.dumps({KEY: TENANT}))
    hub = str(root / "hub")
    tuning = FineTuningConfig(events_every_steps=1, cancel_grace_s=5)
    config = ServeConfig(engine=EngineConfig(model=str(model_dir), hub=hub, kernel_size=sizes.kernel),
                         api_keys_file=str(keys), watch_interval_s=0.5, fine_tuning=tuning)
    base = start({"/": config}, host=HOST, port=free_port(), timeout_s=600, names={"/": "finetune-bench"})
    deploy({hub: str(model_dir)}, tuning)
    return Api(base, backbone_ref(model_dir).name)


def chat_body(model: str, tokens: int, eos: list[int], stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": tokens,
            "temperature": 0, "stream": stream, "logit_bias": {str(i): -100 for i in eos}}


def upload_to_first_token(api: Api, sizes: Sizes, eos: list[int]) -> tuple[dict, str]:
    """(a): the stages' seconds, and the fine-tuned model's name. `waiting` covers validation, the queue
    and the claim (the scheduler may do all three in one poll: `queued` is often never seen)."""
    start = time.perf_counter()
    file_id = api.upload(chat_file(sizes.chats))
    uploaded = time.perf_counter()
    job = api.create(file_id, "greeter", epochs=1, batch_size=4, kernel=sizes.kernel)
    created = time.perf_counter()
    seen = {}
    while job["status"] not in TERMINAL:
        time.sleep(0.1)
        job = api.job(job["id"])
        seen.setdefault(job["status"], time.perf_counter())
    if job["status"] != "succeeded":
        raise RuntimeError(f"the job ended {job['status']}: {job.get('error')}")
    first = first_token_at(api, chat_body(job["fine_tuned_model"], 4, eos, stream=True))
    running = seen.get("running", seen["succeeded"])
    stages = {"upload_s": uploaded - start, "create_s": created - uploaded, "waiting_s": running - created,
              "running_s": seen["succeeded"] - running, "first_token_s": first - seen["succeeded"]}
    row = {"part": "a", "variant": "upload to first token", "round": 0, "seconds": first - start,
           "job_steps": api.steps(job["id"])}
    return row | {name: round(value, 2) for name, value in stages.items()}, job["fine_tuned_model"]


def first_token_at(api: Api, body: dict) -> float:
    with api.http.stream("POST", "/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                return time.perf_counter()
    raise RuntimeError("the stream ended without a token")


@dataclass
class Tally:
    requests: int = 0
    tokens: int = 0
    errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def steady_client(api: Api, body: dict, seconds: float, clients: int) -> Tally:
    """`clients` threads, each sending one request after another; what completed within the window."""
    tally, end = Tally(), time.perf_counter() + seconds

    def loop() -> None:
        with httpx.Client(base_url=f"{api.base}/v1", headers=api.http.headers, timeout=300) as http:
            while time.perf_counter() < end:
                response = http.post("/chat/completions", json=body)
                if time.perf_counter() > end:
                    return
                with tally.lock:
                    if response.status_code == 200:
                        tally.requests += 1
                        tally.tokens += response.json()["usage"]["completion_tokens"]
                    else:
                        tally.errors += 1

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


def training_job(api: Api, sizes: Sizes) -> str:
    """A job long enough to train through a window, running its first steps when this returns."""
    file_id = api.upload(chat_file(sizes.chats * 2))
    job = api.create(file_id, "beside", epochs=50, batch_size=2, kernel=sizes.kernel)
    deadline = time.monotonic() + 600
    while api.steps(job["id"]) < 1:
        if time.monotonic() > deadline or api.job(job["id"])["status"] in TERMINAL:
            raise RuntimeError(f"the job beside the client did not start training: {api.job(job['id'])}")
        time.sleep(0.2)
    return job["id"]


def serving_beside_a_job(api: Api, model: str, sizes: Sizes, eos: list[int]) -> list[dict]:
    """(c): the steady client's throughput without a job and with one training, rounds interleaved."""
    body = chat_body(model, sizes.tokens, eos)
    steady_client(api, body, min(5.0, sizes.window_s), sizes.clients)  # warm-up
    rows = []
    for round_ in range(sizes.serve_rounds):
        alone = steady_client(api, body, sizes.window_s, sizes.clients)
        rows.append(throughput_row("none", round_, alone, sizes.window_s))
        job_id = training_job(api, sizes)
        before = api.steps(job_id)
        beside = steady_client(api, body, sizes.window_s, sizes.clients)
        steps = api.steps(job_id) - before
        api.call("POST", f"/fine_tuning/jobs/{job_id}/cancel")
        rows.append(throughput_row("a job training", round_, beside, sizes.window_s, steps)
                    | {"vs_reference": beside.tokens / max(alone.tokens, 1)})
    return rows


def throughput_row(variant: str, round_: int, tally: Tally, seconds: float, steps: int | None = None) -> dict:
    return {"part": "c", "variant": variant, "round": round_, "seconds": seconds,
            "requests_per_s": tally.requests / seconds, "tokens_per_s": tally.tokens / seconds,
            "errors": tally.errors, "job_steps": steps}


# --- the report -----------------------------------------------------------------------------------


def median_of(rows: list[dict], part: str, variant: str, key: str) -> float | None:
    values = [r[key] for r in rows if r["part"] == part and r["variant"] == variant and r.get(key) is not None]
    return statistics.median(values) if values else None


def notes(args: argparse.Namespace, sizes: Sizes, rows: list[dict], models: dict[str, str]) -> str:
    (a,) = [r for r in rows if r["part"] == "a"]
    stages = ["upload_s", "create_s", "waiting_s", "running_s", "first_token_s"]
    ratio = median_of(rows, "b", "job", "vs_reference")
    served = median_of(rows, "c", "a job training", "vs_reference")
    weights = "tiny random models (--smoke): the plumbing, not the figures" if args.smoke else "real shipped weights"
    return "\n".join([
        f"Command: `python -m benchmarks finetune{' --smoke' if args.smoke else ''}`. CPU only, {weights}: "
        f"(a) and (c) {models['lm']}, (b) {models['encoder']}. Everything on one machine of {os.cpu_count()} cores, "
        "which other work shared while it ran: the absolute seconds move with that load, the paired ratios less.",
        "",
        f"## (a) Upload to first served token: {a['seconds']:.1f} s",
        "",
        f"A {sizes.chats}-chat file, 1 epoch at batch 4 ({a['job_steps']} steps), DCFT kernel {sizes.kernel} on "
        "every target layer; the job ran as a Ray task with 1 CPU (1 torch thread) beside the serving replica "
        "(all the machine's threads). Stages, from the job's status polled every 0.1 s: `waiting` is validation, "
        "the queue, the claim and the Ray task's start (a worker process importing torch and transformers) "
        "until the runner marks the job `running`; `running` is the backbone's load, the training, the "
        "checkpoint and the publish; `first_token` includes the replica fetching and loading the new adapter "
        "on its first call.",
        "",
        markdown_table([a], stages),
        "",
        f"## (b) A job's training against `dcft train`: {ratio:.3f}x (goal <= 1.1x)" if ratio else "## (b)",
        "",
        f"{sizes.reviews} labelled reviews, {sizes.overhead_epochs} epoch(s) at batch 16, max length 64, kernel "
        f"{sizes.kernel}, no validation, {args.threads} torch thread(s), in this process; {sizes.overhead_rounds} "
        "round(s) after a warm-up of each, the order flipped every round; `vs_reference` is the job's seconds over "
        "`dcft train`'s within one round. Both include loading the backbone; the job also reads its file from the "
        "store, writes its events and a checkpoint per epoch, and publishes.",
        "",
        f"## (c) Serving beside a training job: {served:.2f}x the tokens per second alone" if served else "## (c)",
        "",
        f"{sizes.clients} client threads, each sending chat completions of exactly {sizes.tokens} tokens to the "
        f"fine-tuned model one after another, {sizes.window_s:.0f} s per window; `vs_reference` is the window "
        "with a job training over the window before it. The job (its own Ray task, 1 CPU) was training from "
        "before its window began to after it ended (`job_steps`: its steps within the window).",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama and BERT, short windows")
    parser.add_argument("--rounds", type=int, default=3, help="(b): interleaved rounds")
    parser.add_argument("--serve-rounds", type=int, default=2, help="(c): rounds of (alone, beside a job)")
    parser.add_argument("--window", type=float, default=20, help="(c): seconds per window")
    parser.add_argument("--clients", type=int, default=4, help="(c): client threads")
    parser.add_argument("--threads", type=int, default=1, help="(b): torch threads of both runs")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    return parser.parse_args(argv)


def sizes_of(args: argparse.Namespace) -> Sizes:
    if args.smoke:
        return Sizes(chats=8, reviews=32, overhead_epochs=1, overhead_rounds=1, serve_rounds=1, window_s=2,
                     clients=2, tokens=4, kernel=4)
    return Sizes(chats=8, reviews=400, overhead_epochs=2, overhead_rounds=args.rounds, serve_rounds=args.serve_rounds,
                 window_s=args.window, clients=args.clients, tokens=16, kernel=8)


def models_of(args: argparse.Namespace, root: Path) -> dict[str, Path]:
    if args.smoke:
        from benchmarks.fixtures import tiny_bert_dir, tiny_llama_dir

        return {"lm": tiny_llama_dir(root / "llama"), "encoder": tiny_bert_dir(root / "bert")}
    from backbones.shipped import MINILM, SMOLLM2, resolve_model_dir

    return {"lm": resolve_model_dir(SMOLLM2), "encoder": resolve_model_dir(MINILM)}


def run(args: argparse.Namespace, sizes: Sizes, root: Path, models: dict[str, Path]) -> list[dict]:
    from serving.launch import stop

    rows = overhead(root, models["encoder"], sizes, args.threads)
    print(markdown_table(rows, COLUMNS), flush=True)
    eos = eos_ids(models["lm"])
    try:
        api = start_app(root, models["lm"], sizes)
        row, model = upload_to_first_token(api, sizes, eos)
        print(row, flush=True)
        return [row, *rows, *serving_beside_a_job(api, model, sizes, eos)]
    finally:
        stop()


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, throwaway cluster
    sizes = sizes_of(args)
    with tempfile.TemporaryDirectory(prefix="dcft-bench-finetune-") as tmp:
        models = models_of(args, Path(tmp))
        rows = run(args, sizes, Path(tmp), models)
    names = {"lm": "SmolLM2-135M" if not args.smoke else "a tiny Llama",
             "encoder": "MiniLM-L6" if not args.smoke else "a tiny BERT"}
    name = "finetune_smoke" if args.smoke else "finetune"
    path = write_report(name, "Fine-tuning as a service: upload to first token, training overhead, serving beside "
                        "a job", rows, COLUMNS, notes(args, sizes, rows, names), out_dir=args.out)
    print(f"report: {path}")
    return rows


if __name__ == "__main__":
    main()
