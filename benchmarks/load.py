"""Adapter load latency, file on local disk -> ready to serve, as resident adapters grow; against PEFT.

    python -m benchmarks.load            # real MiniLM, N = 1, 10, 100, 1,000 resident (~3 min on 2 CPU cores)
    python -m benchmarks.load --smoke    # tiny random BERT, N = 1 and 10, seconds (the test suite)

Every sample loads an adapter that is not resident, from files written to a temporary folder on
local disk (read back warm from the page cache). Systems:

- dcft-hub bank: `AdapterBank.load`, with the catalog's reader as loader: read and validate the
  files against the backbone, pack them for the host tier, write them into a free device slot
  (what the engine does after the registry fetch). Unloaded again, untimed, so N stays N. One
  bank per N, timed in interleaved rounds.
- dcft-hub merged: `MergedPlacement.load` swapping to the next adapter: read and validate,
  unmerge the previous one, regenerate dW by transposed convolution and merge it. A merged
  replica holds one adapter by design, so it has one point.
- PEFT LoRA r1 / r8, load: `PeftModel.load_adapter` on BertForSequenceClassification with the
  same target layers (the classifier in modules_to_save: our adapters carry their head too);
  deleted again, untimed.
- PEFT LoRA r1 / r8, load+merge: swap the merged adapter while the N others stay loaded:
  unmerge_adapter, load_adapter, set_adapter, delete_adapter(previous), merge_adapter.

N adapters are loaded first (untimed), then `--samples` loads are timed; p50 / p99 are nearest-rank.
PEFT's load and merge walk every module of the model, N adapters included, so a PEFT point whose
projected time exceeds `--peft-budget` seconds is skipped and says so.

Target: dcft-hub bank p50 under 5 ms for a MiniLM adapter on CPU, flat in N (max p50 / min p50 <= 1.5).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from adapters.store.files import CONFIG_NAME, WEIGHTS_NAME, read_adapter_config, read_adapter_tensors, write_adapter_dir
from backbones.loading import load_backbone, pick_device
from backbones.shipped import MINILM, resolve_model_dir
from benchmarks.harness import AdapterFolders, percentile, timed
from benchmarks.report import RESULTS_DIR, write_report
from serving.config import EngineConfig
from serving.model import ServingModel, build_serving_model

KERNEL = 8
TARGET_P50_MS, TARGET_FLATNESS = 5.0, 1.5
COLUMNS = ["system", "resident", "samples", "p50_ms", "p99_ms", "mean_ms", "note"]
BANK, MERGED = "dcft-hub bank", "dcft-hub merged"


class AdapterFiles:
    """Distinct adapter folders made on demand: a template's tensors plus seeded noise."""

    def __init__(self, template: Path, out: Path, tensors: dict[str, torch.Tensor],
                 write: Callable[[Path, dict[str, torch.Tensor]], None]):
        self.template, self.out, self.tensors, self.write = template, out, tensors, write

    def __call__(self, index: int) -> Path:
        folder = self.out / str(index)
        if not folder.exists():
            noise = torch.Generator().manual_seed(index)
            self.write(folder, {k: t + 0.01 * torch.randn(t.shape, generator=noise) for k, t in self.tensors.items()})
        return folder


def dcft_files(model_dir: Path, work: Path) -> AdapterFiles:
    from benchmarks.fixtures import random_adapter

    template = random_adapter(model_dir, work / "dcft-template", "seq_cls", seed=0, kernel=KERNEL)
    config = read_adapter_config(template)
    return AdapterFiles(template, work / "dcft", read_adapter_tensors(template),
                        lambda folder, tensors: write_adapter_dir(folder, config, tensors))


def peft_files(model_dir: Path, work: Path, rank: int, targets: list[str]) -> AdapterFiles:
    """LoRA adapters of `rank` on `targets`, saved by PEFT itself (then varied tensor by tensor)."""
    torch.manual_seed(rank)
    config = LoraConfig(r=rank, target_modules=targets, task_type="SEQ_CLS")
    model = get_peft_model(load_backbone(model_dir, "seq_cls", 2), config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # PEFT starts B at zero; a trained adapter is not
                param.normal_(std=0.02)
    template = work / f"lora-r{rank}-template"
    model.save_pretrained(template)

    def write(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
        folder.mkdir(parents=True)
        shutil.copy(template / CONFIG_NAME, folder / CONFIG_NAME)
        save_file(tensors, folder / WEIGHTS_NAME)

    return AdapterFiles(template, work / f"lora-r{rank}", load_file(template / WEIGHTS_NAME), write)


def row(system: str, resident: int, seconds: list[float], note: str = "") -> dict:
    if not seconds:
        return {"system": system, "resident": resident, "samples": 0, "note": note}
    ms = {"p50_ms": 1e3 * percentile(seconds, 50), "p99_ms": 1e3 * percentile(seconds, 99),
          "mean_ms": 1e3 * sum(seconds) / len(seconds)}
    return {"system": system, "resident": resident, "samples": len(seconds), **ms, "note": note}


# --- dcft-hub ------------------------------------------------------------------------------------


def serving_model(model_dir: Path, mode: str, slots: int, template: Path) -> ServingModel:
    """The model the engine serves, reading adapters straight from folders (key = the folder's path)."""
    config = EngineConfig(model=str(model_dir), mode=mode, kernel_size=read_adapter_config(template).kernel_size,
                          device_slots=slots, host_capacity=slots)
    return build_serving_model(model_dir, config, AdapterFolders, pick_device(), torch.float32)


def measure_bank(model_dir: Path, files: AdapterFiles, counts: list[int], samples: int) -> list[dict]:
    """One bank per N, timed in interleaved rounds so the machine's drift hits every N alike."""
    device = pick_device()
    banks = {count: serving_model(model_dir, "mixed", count + 1, files.template).placement for count in counts}
    for count, bank in banks.items():
        for index in range(count):
            bank.load(str(files(samples + index)))
    sample_keys = [str(files(j)) for j in range(samples)]
    seconds: dict[int, list[float]] = {count: [] for count in counts}
    for key in sample_keys[:1] + sample_keys:  # the first round warms up and is not kept
        for count, bank in banks.items():
            seconds[count].append(timed(lambda: bank.load(key), device))  # noqa: B023 - called at once
            bank.unload(key)
    rows = [row(BANK, count, times[1:]) for count, times in seconds.items()]
    for r in rows:
        print(f"{BANK:28} N={r['resident']:<5} p50 {r['p50_ms']:8.2f} ms", flush=True)
    return rows


def measure_merged(model_dir: Path, files: AdapterFiles, samples: int) -> dict:
    device = pick_device()
    placement = serving_model(model_dir, "merged", 1, files.template).placement
    placement.load(str(files(samples)))  # something to swap away from, from the first sample on
    seconds = [timed(lambda j=j: placement.load(str(files(j))), device) for j in range(samples)]
    print(f"{MERGED:28} N=1     p50 {1e3 * percentile(seconds, 50):8.2f} ms", flush=True)
    return row(MERGED, 1, seconds, "one adapter per replica by design")


# --- PEFT ----------------------------------------------------------------------------------------


def peft_load_samples(model: PeftModel, files: AdapterFiles, samples: int, device: torch.device) -> list[float]:
    seconds = []
    for j in range(samples):
        seconds.append(timed(lambda j=j: model.load_adapter(files(j), adapter_name=f"sample{j}"), device))
        model.delete_adapter(f"sample{j}")
    return seconds


def peft_merge_samples(model: PeftModel, files: AdapterFiles, samples: int, device: torch.device) -> list[float]:
    """Swap the merged adapter `samples` times; the resident ones stay loaded, unmerged."""
    previous, seconds = None, []

    def swap(name: str, folder: Path) -> None:
        model.unmerge_adapter()
        model.load_adapter(folder, adapter_name=name)
        model.set_adapter(name)
        if previous is not None:
            model.delete_adapter(previous)
        model.merge_adapter()

    for j in range(samples):
        seconds.append(timed(lambda j=j: swap(f"merged{j}", files(j)), device))
        previous = f"merged{j}"
    model.unmerge_adapter()
    model.set_adapter("fill0")
    model.delete_adapter(previous)
    return seconds


def measure_peft(model_dir: Path, files: AdapterFiles, rank: int, counts: list[int], samples: int,
                 budget_s: float) -> list[dict]:
    """Load and load+merge at each N, until the next point is projected past the budget."""
    device = pick_device()
    started = time.perf_counter()
    model = PeftModel.from_pretrained(load_backbone(model_dir, "seq_cls", 2, device), files(samples), "fill0")
    load_name, merge_name = f"PEFT LoRA r{rank} load", f"PEFT LoRA r{rank} load+merge"
    rows, resident, per_load, per_merge = [], 1, 0.0, 0.0
    for count in counts:
        # PEFT's costs grow ~linearly in N (measured): the fill sums that ramp, the samples run at N
        grow = count / resident
        projected = per_load * (count**2 - resident**2) / (2 * resident) + samples * (per_load + per_merge) * grow
        spent = time.perf_counter() - started
        if spent + projected > budget_s:
            note = f"skipped: projected {projected:.0f} s more, over the {budget_s:.0f} s budget ({spent:.0f} s spent)"
            rows += [row(load_name, count, [], note), row(merge_name, count, [], note)]
            print(f"{load_name:28} N={count:<5} {note}", flush=True)
            continue
        for index in range(resident, count):
            model.load_adapter(files(samples + index), adapter_name=f"fill{index}")
        resident = count
        loads = peft_load_samples(model, files, samples, device)
        merges = peft_merge_samples(model, files, samples, device)
        per_load, per_merge = percentile(loads, 50), percentile(merges, 50)
        rows += [row(load_name, count, loads), row(merge_name, count, merges)]
        print(f"{load_name:28} N={count:<5} p50 {1e3 * per_load:8.2f} ms, load+merge {1e3 * per_merge:8.2f} ms",
              flush=True)
    return rows


# --- report --------------------------------------------------------------------------------------


def target_summary(rows: list[dict]) -> str:
    p50s = [r["p50_ms"] for r in rows if r["system"] == BANK]
    flatness = max(p50s) / min(p50s)
    met = max(p50s) < TARGET_P50_MS and flatness <= TARGET_FLATNESS
    return (f"Target (dcft-hub bank p50 < {TARGET_P50_MS:g} ms at every N, max/min p50 <= {TARGET_FLATNESS:g}): "
            f"{'met' if met else 'NOT met'}: p50 {', '.join(f'{p:.2f}' for p in p50s)} ms, "
            f"max/min {flatness:.2f}.")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in dict.fromkeys(r["system"] for r in rows):
        points = [(r["resident"], r["p50_ms"]) for r in rows if r["system"] == system and r.get("p50_ms")]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=system)
    ax.axhline(TARGET_P50_MS, linestyle="--", color="gray", linewidth=0.8, label="target: bank p50")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("adapters already resident (N)")
    ax.set_ylabel("p50 load latency, ms")
    ax.set_title("Adapter load: file on local disk -> ready to serve")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def notes(args: argparse.Namespace, summary: str) -> str:
    return (f"Backbone `{args.model}`, DCFT kernel {KERNEL} rank 1 with a 2-label head; PEFT LoRA on the same "
            f"target layers with the classifier in modules_to_save, PEFT's own file format and default "
            f"`load_adapter` arguments. {args.samples} timed loads per point (PEFT: {args.peft_samples}), each of an "
            f"adapter not resident, files warm in the page cache; p50/p99 nearest-rank, so p99 of a few samples is "
            f"their maximum. PEFT budget {args.peft_budget:g} s per rank.\n\n{summary}\n\n"
            "Regenerate: `python -m benchmarks.load`.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 10, 100, 1000], help="resident counts N")
    parser.add_argument("--samples", type=int, default=100, help="timed loads per dcft-hub point")
    parser.add_argument("--peft-samples", type=int, default=20, help="timed loads per PEFT point")
    parser.add_argument("--peft-ranks", type=int, nargs="*", default=[1, 8], help="LoRA ranks (none: skip PEFT)")
    parser.add_argument("--peft-budget", type=float, default=600, help="seconds per PEFT rank, fills included")
    parser.add_argument("--model", default=None, help="backbone alias or folder (default minilm; smoke: tiny BERT)")
    parser.add_argument("--smoke", action="store_true", help="tiny random BERT, N = 1 and 10: for tests")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    args = parser.parse_args(argv)
    if args.smoke:
        args.counts, args.samples, args.peft_samples, args.peft_budget = [1, 10], 5, 3, 120
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*[Aa]lready unmerged.*")  # PEFT, on the first swap
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # PEFT calls a deprecated name
    with tempfile.TemporaryDirectory(prefix="dcft-bench-load-") as tmp:
        work = Path(tmp)
        if args.model is None and args.smoke:
            from benchmarks.fixtures import tiny_bert_dir

            args.model = str(tiny_bert_dir(work / "tiny-bert"))
        args.model = args.model or MINILM
        model_dir = resolve_model_dir(args.model)
        ours = dcft_files(model_dir, work)
        rows = measure_bank(model_dir, ours, args.counts, args.samples)
        rows.append(measure_merged(model_dir, ours, args.samples))
        targets = read_adapter_config(ours.template).target_layers
        for rank in args.peft_ranks:
            lora = peft_files(model_dir, work, rank, targets)
            rows += measure_peft(model_dir, lora, rank, args.counts, args.peft_samples, args.peft_budget)
    summary = target_summary(rows)
    name = "load_smoke" if args.smoke else "load"
    path = write_report(name, "Adapter load latency vs resident adapters", rows, COLUMNS, notes(args, summary),
                        out_dir=args.out)
    plot(rows, args.out / f"{name}.png")
    print(summary)
    print(f"report: {path}")
    return rows


if __name__ == "__main__":
    main()
