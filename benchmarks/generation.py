"""Generation under open-loop load: static batching vs continuous batching across adapters.

    python -m benchmarks generation            # SmolLM2-135M (real weights), 64 random adapters
    python -m benchmarks generation --smoke    # tiny random Llama, a few requests per point

Real HTTP on 127.0.0.1. Two Serve apps on one Ray instance, the same backbone and hub,
under two route prefixes: `engine.batching = "static"` (one `@serve.batch` batch decodes
until its longest row is done) and `"continuous"` (rows join after their own prefill and
leave when done). At each offered rate both apps get the same seeded request sequence,
one after the other: Poisson arrivals (open loop: a request is sent at its time whatever
the server is doing), an adapter drawn uniformly from N published ones (one tenant each,
each request with its tenant's key), a prompt cut from real reviews to a drawn token
length and `max_tokens` drawn likewise (log-uniform), `temperature 0`, and EOS pushed down
by a logit bias of -100 so every request produces exactly its drawn length. Requests
stream (SSE): TTFT is the time to the first non-empty text chunk, inter-token latency the
gaps between text chunks, output tokens come from the `include_usage` chunk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from adapters.store.files import read_adapter_config, read_adapter_tensors
from adapters.store.hub import AdapterHub
from benchmarks.harness import HOST, eos_ids, free_port, percentile, publish_variant, review_texts
from benchmarks.report import RESULTS_DIR, write_report
from serving.config import EngineConfig, LimitsConfig, ServeConfig, TenantQuota

MODES = ("static", "continuous")
TARGET_TOKENS, TARGET_TTFT = 2.0, 0.5  # continuous vs static at static's saturating rate
COLUMNS = ["mode", "offered_rps", "arrival_rps", "sent", "completed", "errors", "unfinished", "completed_rps",
           "output_tok_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "e2e_p50_ms", "saturated"]


@dataclass(frozen=True)
class Workload:
    prompt_tokens: tuple[int, int]  # log-uniform, inclusive
    output_tokens: tuple[int, int]
    rates: tuple[float, ...]  # offered requests per second
    seconds: float  # of arrivals per mode and rate
    drain_s: float  # after the last arrival; still-open requests are then cut (unfinished)
    adapters: int
    kernel: int
    seed: int


@dataclass(frozen=True)
class Request:
    at: float  # seconds after the point's start
    adapter: str
    key: str
    prompt: str
    max_tokens: int


@dataclass
class Outcome:
    sent_at: float = 0.0
    chunks: list[float] = field(default_factory=list)  # arrival times of non-empty text chunks
    tokens: int = 0  # completion_tokens of the usage chunk
    done_at: float | None = None
    error: str | None = None


# --- the workload ---------------------------------------------------------------------------------


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return min(high, max(low, round(math.exp(rng.uniform(math.log(low), math.log(high + 1) - 1e-9)))))


class Prompts:
    """Prompts of an exact token count, cut from the reviews joined into one token stream."""

    def __init__(self, model_dir: Path, texts: list[str]):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.ids = self.tokenizer(" ".join(texts), add_special_tokens=False)["input_ids"]

    def cut(self, rng: random.Random, length: int) -> str:
        start = rng.randrange(0, len(self.ids) - length)
        return self.tokenizer.decode(self.ids[start:start + length])

    def eos_ids(self, model_dir: Path) -> list[int]:
        return eos_ids(model_dir)


def schedule(work: Workload, rate: float, names: list[str], keys: dict[str, str], prompts: Prompts,
             seed: int) -> list[Request]:
    """Poisson arrivals over `work.seconds`; the same seed gives every mode the same sequence."""
    rng, at, requests = random.Random(seed), 0.0, []
    while True:
        at += rng.expovariate(rate)
        if at > work.seconds:
            return requests
        name = rng.choice(names)
        prompt = prompts.cut(rng, log_uniform(rng, *work.prompt_tokens))
        requests.append(Request(at, name, keys[name.split("/")[0]], prompt, log_uniform(rng, *work.output_tokens)))


# --- the client -----------------------------------------------------------------------------------


def body_of(request: Request, eos: list[int]) -> dict:
    return {"model": request.adapter, "prompt": request.prompt, "max_tokens": request.max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True},
            "logit_bias": {str(i): -100 for i in eos}}


def read_event(line: str, out: Outcome) -> bool:
    """One SSE line into `out`; True at `data: [DONE]`."""
    if not line.startswith("data: "):
        return False
    payload = line[len("data: "):]
    if payload == "[DONE]":
        return True
    event = json.loads(payload)
    if "error" in event:
        out.error = event["error"].get("code") or event["error"].get("type") or "error event"
        return True
    if any(choice.get("text") for choice in event.get("choices") or []):
        out.chunks.append(time.perf_counter())
    if event.get("usage"):
        out.tokens = event["usage"]["completion_tokens"]
    return False


async def send(http: httpx.AsyncClient, url: str, request: Request, eos: list[int], out: Outcome) -> None:
    out.sent_at = time.perf_counter()
    try:
        async with http.stream("POST", url, json=body_of(request, eos),
                               headers={"Authorization": f"Bearer {request.key}"}) as response:
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}"
                return
            async for line in response.aiter_lines():
                if read_event(line, out):
                    break
        if out.error is None:
            out.done_at = time.perf_counter()
    except httpx.HTTPError as err:
        out.error = type(err).__name__


async def open_loop(url: str, requests: list[Request], eos: list[int], drain_s: float) -> tuple[list[Outcome], float]:
    """Send each request at its time; cut whatever is still open `drain_s` after the last one."""
    outcomes = [Outcome() for _ in requests]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as http:
        start = time.perf_counter()
        tasks = []
        for request, out in zip(requests, outcomes, strict=True):
            await asyncio.sleep(max(0.0, start + request.at - time.perf_counter()))  # the arrival process
            tasks.append(asyncio.create_task(send(http, url, request, eos, out)))
        _, pending = await asyncio.wait(tasks, timeout=drain_s) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return outcomes, start


async def settle(url: str, key: str, adapter: str, timeout_s: float) -> None:
    """One tiny request answered: the work a previous point left queued is done."""
    body = {"model": adapter, "prompt": "a film", "max_tokens": 1, "temperature": 0}
    async with httpx.AsyncClient(timeout=timeout_s) as http:
        answer = await http.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
        answer.raise_for_status()


# --- one point ------------------------------------------------------------------------------------


def ms(values: list[float], q: float) -> float | None:
    return None if not values else round(1e3 * percentile(values, q), 1)


def summarise(mode: str, rate: float, outcomes: list[Outcome], start: float, seconds: float) -> dict:
    """Rates over the arrival window, or until the last completion when that is later."""
    done = [o for o in outcomes if o.done_at is not None]
    texts = [o for o in done if o.chunks]  # a random adapter may emit only special tokens (no text)
    errors = [o.error for o in outcomes if o.error]
    end = max((o.done_at for o in done), default=start)
    window = max(end - start, seconds)
    ttft = [o.chunks[0] - o.sent_at for o in texts]
    gaps = [b - a for o in texts for a, b in zip(o.chunks, o.chunks[1:], strict=False)]
    return {"mode": mode, "offered_rps": rate, "arrival_rps": round(len(outcomes) / seconds, 3),
            "sent": len(outcomes), "completed": len(done),
            "errors": len(errors), "error_kinds": sorted(set(errors)),
            "unfinished": len(outcomes) - len(done) - len(errors), "no_text": len(done) - len(texts),
            "completed_rps": round(len(done) / window, 3),
            "output_tok_s": round(sum(o.tokens for o in done) / window, 1),
            "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
            "itl_p50_ms": ms(gaps, 50), "itl_p99_ms": ms(gaps, 99),
            "e2e_p50_ms": ms([o.done_at - o.sent_at for o in done], 50), "window_s": round(window, 1)}


def mark_saturation(rows: list[dict]) -> None:
    """Saturated: an error, under 80% of the requests completed by the end of the drain (the
    queue grew), or TTFT p50 over 4x the mode's own at its lowest rate (queueing delay)."""
    for mode in MODES:
        own = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["offered_rps"])
        base = own[0]["ttft_p50_ms"] if own else None
        for row in own:
            lagging = row["errors"] > 0 or row["completed"] < 0.8 * row["sent"]
            exploded = base is not None and row["ttft_p50_ms"] is not None and row["ttft_p50_ms"] > 4 * base
            row["saturated"] = bool(lagging or exploded or row["ttft_p50_ms"] is None)


# --- the apps -------------------------------------------------------------------------------------


def tenant_key(index: int) -> str:
    return f"gen-key-{index:04d}-0123456789abcdef"


def publish_adapters(root: Path, model_dir: Path, count: int, kernel: int) -> tuple[AdapterHub, list[str]]:
    """One random causal-LM adapter, published as `count` noisy variants of it (distinct digests)."""
    from benchmarks.fixtures import random_adapter

    template = random_adapter(model_dir, root / "template", "causal_lm", seed=0, kernel=kernel)
    config, tensors = read_adapter_config(template), read_adapter_tensors(template)
    hub = AdapterHub(str(root / "hub"))
    names = [f"tenant{i:04d}/reviews" for i in range(count)]
    for i, name in enumerate(names):
        publish_variant(hub, config, tensors, i, root / "variants", name)
    return hub, names


def serve_config(model_dir: Path, hub: AdapterHub, keys_file: Path, mode: str, work: Workload,
                 kv_cache_len: int) -> ServeConfig:
    engine = EngineConfig(model=str(model_dir), hub=hub.url, kernel_size=work.kernel, batching=mode,
                          device_slots=max(work.adapters, 1), kv_cache_len=kv_cache_len)
    limits = LimitsConfig(request_timeout_s=600, tenant_quota=TenantQuota(max_concurrent=None))
    return ServeConfig(engine=engine, limits=limits, api_keys_file=str(keys_file), watch_interval_s=0)


def start_apps(root: Path, model_dir: Path, hub: AdapterHub, names: list[str], work: Workload,
               kv_cache_len: int) -> tuple[str, dict[str, str]]:
    from serving.launch import start

    keys = {tenant_key(i): name.split("/")[0] for i, name in enumerate(names)}
    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps(keys))
    apps = {f"/{mode}": serve_config(model_dir, hub, keys_file, mode, work, kv_cache_len) for mode in MODES}
    base = start(apps, HOST, free_port(), timeout_s=600, names={prefix: prefix.strip("/") for prefix in apps})
    return base, {tenant: key for key, tenant in keys.items()}


def warm_up(base: str, names: list[str], keys: dict[str, str], eos: list[int]) -> None:
    """Every adapter once in each app (resident on the device), short requests."""
    for mode in MODES:
        requests = [Request(i * 0.01, name, keys[name.split("/")[0]], "a fine film", 2) for i, name in
                    enumerate(names)]
        outcomes, _ = asyncio.run(open_loop(f"{base}/{mode}/v1/completions", requests, eos, 600))
        failed = [o.error for o in outcomes if o.done_at is None]
        if failed:
            raise RuntimeError(f"warm-up of {mode} failed: {failed[:3]}")


def measure(base: str, work: Workload, names: list[str], keys: dict[str, str], prompts: Prompts,
            eos: list[int]) -> list[dict]:
    """Each rate, both modes in turn on the same request sequence."""
    rows = []
    for index, rate in enumerate(work.rates):
        requests = schedule(work, rate, names, keys, prompts, work.seed + index)
        for mode in MODES:
            url = f"{base}/{mode}/v1/completions"
            outcomes, start = asyncio.run(open_loop(url, requests, eos, work.drain_s))
            rows.append(summarise(mode, rate, outcomes, start, work.seconds))
            print_row(rows[-1])
            asyncio.run(settle(url, keys[names[0].split("/")[0]], names[0], 900))
    return rows


def print_row(row: dict) -> None:
    print(f"{row['mode']:<10} {row['offered_rps']:5.2f} req/s: {row['completed']}/{row['sent']} done, "
          f"{row['errors']} errors, {row['output_tok_s']} tok/s, TTFT p50 {row['ttft_p50_ms']} ms "
          f"p99 {row['ttft_p99_ms']} ms, ITL p50 {row['itl_p50_ms']} ms", flush=True)


# --- report ---------------------------------------------------------------------------------------


def verdict(rows: list[dict]) -> dict:
    """At the lowest rate where static batching saturates: continuous vs static."""
    static = [r for r in rows if r["mode"] == "static"]
    served = {mode: last_unsaturated([r for r in rows if r["mode"] == mode]) for mode in MODES}
    before = {f"{mode}_max_unsaturated_rps": row and row["offered_rps"] for mode, row in served.items()}
    before |= {f"{mode}_requests_served_before_saturation": row and row["completed"] for mode, row in served.items()}
    point = min((r for r in static if r["saturated"]), key=lambda r: r["offered_rps"], default=None)
    if point is None:
        return before | {"saturating_rps": None}
    cont = next(r for r in rows if r["mode"] == "continuous" and r["offered_rps"] == point["offered_rps"])
    tokens = cont["output_tok_s"] / point["output_tok_s"] if point["output_tok_s"] else None
    ttft = (cont["ttft_p50_ms"] / point["ttft_p50_ms"]
            if cont["ttft_p50_ms"] is not None and point["ttft_p50_ms"] else None)
    top = max(rows, key=lambda r: r["offered_rps"])["offered_rps"]
    at_top = {r["mode"]: r["output_tok_s"] for r in rows if r["offered_rps"] == top}
    before |= {"highest_rps": top, "tok_s_ratio_at_highest": at_top["static"] and round(
        at_top["continuous"] / at_top["static"], 2), "continuous_completed_at_saturating": cont["completed"],
        "sent_at_saturating": cont["sent"]}
    return before | {"saturating_rps": point["offered_rps"], "tok_s_ratio": tokens and round(tokens, 2),
                     "ttft_p50_ratio": ttft and round(ttft, 3),
                     "tok_s_target_met": tokens is not None and tokens >= TARGET_TOKENS,
                     "ttft_target_met": ttft is not None and ttft <= TARGET_TTFT}


def last_unsaturated(rows: list[dict]) -> dict | None:
    """The highest rate below the first saturated one."""
    last = None
    for row in sorted(rows, key=lambda r: r["offered_rps"]):
        if row["saturated"]:
            return last
        last = row
    return last


def summary_line(found: dict) -> str:
    everything = found.get("continuous_completed_at_saturating") == found.get("sent_at_saturating")
    bounded = ", so its tokens/s is bounded by the offered load" if everything else ""
    served = (f"Requests served before saturation (highest unsaturated rate, its completed requests): static "
              f"{found['static_max_unsaturated_rps']} req/s ({found['static_requests_served_before_saturation']}), "
              f"continuous {found['continuous_max_unsaturated_rps']} req/s "
              f"({found['continuous_requests_served_before_saturation']}).")
    if found["saturating_rps"] is None:
        return f"Static batching did not saturate at any rate measured: targets not evaluated. {served}"
    return (f"Static batching saturates at {found['saturating_rps']:g} req/s. There, continuous batching gives "
            f"{found['tok_s_ratio']}x static's output tokens/s (target >= {TARGET_TOKENS:g}x: "
            f"{'met' if found['tok_s_target_met'] else 'NOT met'}) and {found['ttft_p50_ratio']}x its TTFT p50 "
            f"(target <= {TARGET_TTFT:g}x: {'met' if found['ttft_target_met'] else 'NOT met'}); continuous "
            f"completed {found['continuous_completed_at_saturating']}/{found['sent_at_saturating']} requests "
            f"there{bounded}. At the highest rate, "
            f"{found['highest_rps']:g} req/s: {found['tok_s_ratio_at_highest']}x static's output tokens/s. {served}")


def few_note(rows: list[dict], least: int = 10) -> str:
    few = sorted({r["offered_rps"] for r in rows if r["sent"] < least})
    return f" Rates {few} drew fewer than {least} requests: their percentiles are rough." if few else ""


def notes(args: argparse.Namespace, work: Workload, found: dict, eos: list[int], kv_cache_len: int,
          rows: list[dict]) -> str:
    from backbones.shipped import SMOLLM2

    model = "tiny random Llama (smoke)" if args.smoke else f"`{args.model or SMOLLM2}` (real weights)"
    measured = f" Rows from the run that ended {args.measured_on}; this report re-rendered from them." \
        if args.measured_on else ""
    return (
        f"{summary_line(found)}\n\n"
        f"What ran where: CPU only ({os.cpu_count()} cores, shared with other jobs: absolute figures move with "
        f"the machine's load; both modes run one after the other at each rate, so drift hits both), backbone "
        f"{model}, {work.adapters} random DCFT adapters (kernel {work.kernel}, noisy variants of one random "
        f"adapter, one tenant and API key each), both Serve apps in one Ray instance (one replica each; only "
        f"the app being measured gets traffic), HTTP on {HOST}; the load generator shares the CPUs.\n\n"
        f"Workload (seed {work.seed}): Poisson arrivals for {work.seconds:g} s per mode and rate; each request "
        f"picks an adapter uniformly; prompt length log-uniform in {list(work.prompt_tokens)} tokens (cut from "
        f"real rotten-tomatoes reviews with the model's tokenizer, so the served prompt_tokens may differ by a "
        f"token or two after re-tokenising); output length log-uniform in {list(work.output_tokens)} tokens, "
        f"sent as `max_tokens`; `temperature 0`; `logit_bias` -100 on the EOS ids {eos}, so every request "
        f"generates exactly its drawn length (random adapters would otherwise stop early). Requests still open "
        f"{work.drain_s:g} s after the last arrival are cut and counted as unfinished; between points one tiny "
        f"request must be answered (the previous point's queue is gone).{few_note(rows)}\n\n"
        f"Measured: completed = the stream ended with `data: [DONE]` and no error event; TTFT = send to first "
        f"non-empty streamed text chunk (over completed requests with text: `no_text` in the JSON counts those "
        f"whose tokens all decode to nothing); ITL = gaps between text chunks (static "
        f"batching streams its whole answer as one chunk when the batch ends, so it has no ITL and its TTFT is "
        f"its end-to-end latency); output tok/s = usage completion_tokens of completed requests / (last "
        f"completion - point start, or the arrival window when longer); completed_rps likewise; arrival_rps = "
        f"requests sent / arrival window. Saturated: an error, under 80% of the requests completed by the end "
        f"of the drain, or TTFT p50 above 4x the mode's own at its lowest rate (a request longer than the "
        f"drain at this machine's per-token speed can be cut without the queue growing, so one unfinished "
        f"request alone is not saturation).\n\n"
        f"Settings: static = `@serve.batch` max_batch_size 32, wait 5 ms; continuous = max_running "
        f"{EngineConfig().max_running} (default), kv_cache_len {kv_cache_len}, KV budget "
        f"{EngineConfig().kv_cache_gib:g} GiB; request_timeout_s 600, no tenant quota.{measured} "
        f"Ray Serve model multiplexing as the per-adapter baseline is not run here: "
        f"benchmarks/multiplex_baseline.py serves classification only (see benchmarks/results/serving.md for "
        f"that comparison). Regenerate: `python -m benchmarks generation{regenerate_flags(args)}`."
    )


# --- main -----------------------------------------------------------------------------------------


def regenerate_flags(args: argparse.Namespace) -> str:
    """The options that made this report, as the command line that makes it again."""
    flags = " --smoke" if args.smoke else ""
    if not args.smoke and args.rates != [0.05, 0.15, 0.4]:
        flags += " --rates " + " ".join(f"{rate:g}" for rate in args.rates)
    return flags + (f" --name {args.name}" if args.name else "")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.05, 0.15, 0.4], help="offered req/s")
    parser.add_argument("--seconds", type=float, default=120, help="seconds of arrivals per mode and rate")
    parser.add_argument("--drain", type=float, default=60, help="seconds after the last arrival to finish")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--kernel", type=int, default=8, help="DCFT kernel (must tile the model's layers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, 2 rates, a few requests")
    parser.add_argument("--model", default=None, help="backbone alias or folder (default: smollm2)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument("--name", default=None, help="report name (default: generation, or generation_smoke)")
    parser.add_argument("--rerender", type=Path, default=None,
                        help="rewrite the report from this run's JSON rows (same options), measuring nothing")
    args = parser.parse_args(argv)
    args.measured_on = None  # set when re-rendering: the date of the run the rows come from
    if args.smoke:
        args.rates, args.seconds, args.drain, args.adapters, args.kernel = [2.0, 4.0], 4, 60, 4, 4
    return args


def workload(args: argparse.Namespace) -> tuple[Workload, int]:
    """The workload and the continuous decoder's KV cache length (prompt + output fits)."""
    prompt, output = ((4, 32), (4, 32)) if args.smoke else ((16, 512), (8, 256))
    work = Workload(prompt, output, tuple(args.rates), args.seconds, args.drain, args.adapters, args.kernel,
                    args.seed)
    return work, 128 if args.smoke else 1024


def run(args: argparse.Namespace, work: Workload, kv_cache_len: int, root: Path) -> tuple[list[dict], list[int]]:
    from backbones.shipped import SMOLLM2, resolve_model_dir
    from benchmarks.fixtures import tiny_llama_dir
    from serving.launch import stop

    os.environ["DCFT_HUB_CACHE"] = str(root / "cache")  # replicas inherit it: a private adapter cache
    if args.model:
        model_dir = resolve_model_dir(args.model)
    else:
        model_dir = tiny_llama_dir(root / "llama") if args.smoke else resolve_model_dir(SMOLLM2)
    hub, names = publish_adapters(root, model_dir, work.adapters, work.kernel)
    prompts = Prompts(model_dir, review_texts())
    eos = prompts.eos_ids(model_dir)
    try:
        base, keys = start_apps(root, model_dir, hub, names, work, kv_cache_len)
        warm_up(base, names, keys, eos)
        return measure(base, work, names, keys, prompts, eos), eos
    finally:
        stop()


def collect(args: argparse.Namespace, work: Workload, kv_cache_len: int) -> tuple[list[dict], list[int]]:
    """Measure, or (--rerender) read the rows of an earlier run: the EOS ids it biased come
    from its verdict, or again from the model's tokenizer."""
    if not args.rerender:
        with tempfile.TemporaryDirectory(prefix="dcft-bench-generation-") as tmp:
            return run(args, work, kv_cache_len, Path(tmp))
    saved = json.loads(args.rerender.read_text())
    args.measured_on = saved["environment"]["date"]
    eos = saved.get("verdict", {}).get("eos_ids")
    if eos is None:
        from backbones.shipped import SMOLLM2, resolve_model_dir

        model_dir = resolve_model_dir(args.model or SMOLLM2)
        eos = Prompts(model_dir, ["a"]).eos_ids(model_dir)
    return saved["rows"], eos


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, throwaway cluster
    work, kv_cache_len = workload(args)
    rows, eos = collect(args, work, kv_cache_len)
    mark_saturation(rows)
    found = verdict(rows)
    name = args.name or ("generation_smoke" if args.smoke else "generation")
    path = write_report(name, "Generation under open-loop load: static vs continuous batching", rows, COLUMNS,
                        notes(args, work, found, eos, kv_cache_len, rows), out_dir=args.out)
    report = args.out / f"{name}.json"  # the verdict beside the rows, for scripts
    verdict_json = found | {"eos_ids": eos}
    report.write_text(json.dumps(json.loads(report.read_text()) | {"verdict": verdict_json}, indent=2))
    print(summary_line(found))
    print(f"report: {path}")
    return rows


if __name__ == "__main__":
    main()
