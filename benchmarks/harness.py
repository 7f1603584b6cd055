"""What the benchmarks share: timing, percentiles, review texts, a hub of many adapters,
adapters read straight from folders, and local ports. Each benchmark module is one benchmark;
the helpers two of them need live here.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import random
import shutil
import socket
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters.config import AdapterConfig
from adapters.store.files import read_adapter_config, read_adapter_tensors, write_adapter_dir
from adapters.store.hub import AdapterHub, AdapterVersion
from backbones.loading import pick_device
from benchmarks.report import markdown_table
from serving.bank import HostAdapter
from serving.catalog import read_host_adapter
from serving.model import BackboneShape

HOST = "127.0.0.1"  # traffic never leaves the machine
API_KEY = "bench-admin-key-0123456789"  # one admin key: the auth path runs, every adapter is usable
KERNEL = 8
LABELS = ("rotten", "fresh")
# cpu: process CPU time, which other jobs on a shared machine do not inflate (CPU device only)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# --- timing -------------------------------------------------------------------------------------


@dataclass
class Variant:
    system: str
    distinct: int  # 0 for bare
    run: Callable[[], None]  # the timed work: one batch forward, or `steps` decode steps
    reset: Callable[[], None] = lambda: None  # untimed, before each run (decode: crop the KV cache)


def add_timing_options(parser: argparse.ArgumentParser) -> None:
    """The options every timed benchmark here shares (forward, train_step)."""
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 resists a shared machine)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall", help="cpu: process time (CPU only)")


def timing_device(args: argparse.Namespace) -> torch.device:
    device = pick_device(args.device)
    if args.clock == "cpu" and device.type == "cuda":
        raise SystemExit("--clock cpu times the host only; use --clock wall on CUDA")
    return device


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """`count` torch CPU threads inside (None: unchanged), restored after: tests call main() in-process."""
    before = torch.get_num_threads()
    torch.set_num_threads(count or before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sync_for(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def timed_rounds(variants: list[Variant], rounds: int, device: torch.device, clock: str = "wall") -> list[list[float]]:
    """Seconds per run of each variant in each round; variants interleaved in every round, so drift
    hits all alike and a round's runs can be compared with one another. Each round runs them in a
    new order (seeded), so no variant always follows the same one (caches, clocks, the allocator)."""
    sync, now = sync_for(device), CLOCKS[clock]
    samples: list[list[float]] = [[] for _ in variants]
    for variant in variants:  # warm-up
        variant.reset()
        variant.run()
    order = random.Random(0)
    for _ in range(rounds):
        for index in order.sample(range(len(variants)), len(variants)):
            variant = variants[index]
            variant.reset()
            sync()
            start = now()
            variant.run()
            sync()
            samples[index].append(now() - start)
    return samples


def time_variants(variants: list[Variant], rounds: int, device: torch.device, clock: str = "wall") -> list[float]:
    """Median seconds per run of each variant, over interleaved rounds."""
    return [statistics.median(times) for times in timed_rounds(variants, rounds, device, clock)]


def paired_speed(samples: Sequence[Sequence[float]], reference: int = 0) -> list[tuple[float, float, float]]:
    """Each variant's speed against `reference`'s, as (median, lower quartile, upper quartile) over rounds
    of reference time / variant time within one round: pairing a run with its neighbour cancels the
    slow drifts (another job, thermal, frequency) that a ratio of two medians keeps."""
    out = []
    for times in samples:
        ratios = sorted(ref / took for ref, took in zip(samples[reference], times, strict=True))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out.append((statistics.median(ratios), quartiles[0], quartiles[2]))
    return out


def where_time_goes(reference: Variant, candidate: Variant, timed: Sequence[float], device: torch.device,
                    top: int = 8) -> str:
    """Markdown tables: the ops whose self time differs most between one run of each variant.

    `timed` holds the variants' median seconds, to set beside the ops' totals: what the ops
    do not account for is per-call overhead outside them (Python, the dispatcher). On CUDA a
    second table gives the host's side (CPU self time per op), where launch costs show.
    """
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    clocks = ["self_device_time_total", "self_cpu_time_total"] if device.type == "cuda" else ["self_cpu_time_total"]
    variants = (reference, candidate)
    events = []
    for variant in variants:
        variant.reset()
        with profile(activities=activities) as prof:
            variant.run()
            sync_for(device)()
        events.append(prof.key_averages())
    medians = ", ".join(f"{v.system} {s * 1e3:.1f} ms" for v, s in zip(variants, timed, strict=True))
    text = [f"timed (median) {medians}"]
    for attr in clocks:
        per_op = [{e.key: getattr(e, attr) / 1e3 for e in averages} for averages in events]  # ms
        text += ["", _op_table(variants, per_op, attr, top)]
    return "\n".join(text)


def _op_table(variants: Sequence[Variant], per_op: list[dict[str, float]], attr: str, top: int) -> str:
    names = [f"{v.system}_ms" for v in variants]
    ops = sorted(set(per_op[0]) | set(per_op[1]), key=lambda k: -abs(per_op[1].get(k, 0) - per_op[0].get(k, 0)))
    rows = []
    for op in ops[:top]:
        ref, cand = per_op[0].get(op, 0.0), per_op[1].get(op, 0.0)
        rows.append({"op": op[:90], names[0]: ref, names[1]: cand, "extra_ms": cand - ref})
    totals = ", ".join(f"{v.system} {sum(ms.values()):.1f} ms" for v, ms in zip(variants, per_op, strict=True))
    where = "device" if attr == "self_device_time_total" else "host (CPU)"
    head = f"{where} self time per op in one run under torch.profiler, in all: {totals}"
    return f"{head}\n\n" + markdown_table(rows, ["op", *names, "extra_ms"])


def timed(action: Callable[[], object], device: torch.device) -> float:
    """Seconds for `action`, device work included."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    action()
    sync()
    return time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (an observed value); NaN when nothing succeeded."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# --- inputs and adapters ------------------------------------------------------------------------


def review_texts(split: str = "test") -> list[str]:
    """Real rotten-tomatoes reviews of one split of the shipped data."""
    from training.data import DataConfig, load_dataset

    return [example.text for example in getattr(load_dataset(DataConfig()), split)]


def eos_ids(model_dir: Path) -> list[int]:
    """Every token id that ends a generation of this model: its tokenizer's and its generation config's."""
    from transformers import AutoTokenizer, GenerationConfig

    found = {AutoTokenizer.from_pretrained(model_dir).eos_token_id}
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        found |= set(eos if isinstance(eos, list) else [eos])
    except OSError:
        pass
    return sorted(i for i in found if i is not None)


def adapter_name(index: int) -> str:
    return f"tenant{index:04d}/sentiment"  # one tenant each: many tenants' tasks, as in production


def build_hub(root: Path, model_dir: Path, count: int) -> tuple[AdapterHub, list[str]]:
    """A hub with `count` distinct classification adapters for the backbone in `model_dir`.

    Building each from the backbone would take minutes for 1,000, so one template is built
    and the rest are its tensors plus seeded noise: same shapes, distinct bytes and digests.
    """
    from benchmarks.fixtures import random_adapter

    template = random_adapter(model_dir, root / "template", "seq_cls", seed=0, labels=LABELS, kernel=KERNEL)
    config, tensors = read_adapter_config(template), read_adapter_tensors(template)
    hub = AdapterHub(str(root / "hub"))
    work = root / "variants"

    def publish(index: int) -> str:
        return publish_variant(hub, config, tensors, index, work, adapter_name(index)).name

    names = [publish(0)]  # alone: the first publish writes hub.json
    with ThreadPoolExecutor(max_workers=8) as pool:  # publishing waits on fsync, not on the CPU
        names += pool.map(publish, range(1, count))
    return hub, names


def publish_variant(hub: AdapterHub, config: AdapterConfig, tensors: dict[str, torch.Tensor], seed: int,
                    work: Path, name: str) -> AdapterVersion:
    """Publish the template's tensors plus noise seeded by `seed` as a new version of `name`."""
    generator = torch.Generator().manual_seed(seed)
    varied = {key: t + 0.05 * torch.randn(t.shape, generator=generator) for key, t in tensors.items()}
    folder = write_adapter_dir(work / str(seed), config, varied)
    version = hub.publish(folder, name)
    shutil.rmtree(folder)
    return version


class AdapterFolders:
    """Adapters read straight from folders and validated as the catalog does: the key is the
    folder, or every key reads one `template` folder (distinct keys, identical bytes)."""

    def __init__(self, shape: BackboneShape, template: Path | None = None):
        self.shape, self.template = shape, template

    def load(self, key: str) -> HostAdapter:
        folder = self.template or Path(key)
        return read_host_adapter(folder, key, self.shape.ref, self.shape.layer_dims, self.shape.hidden_size)


# --- ports --------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


# --- load -------------------------------------------------------------------------------------
