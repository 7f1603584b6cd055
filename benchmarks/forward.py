"""Whole-model throughput with mixed-adapter batches: the bare backbone vs DCFT vs PEFT.

    python -m benchmarks.forward                        # real MiniLM and SmolLM2-135M (~20 min on 2 CPU cores)
    python -m benchmarks.forward --threads 1 --clock cpu  # the same, robust to other jobs on a shared machine
    python -m benchmarks.forward --smoke                # tiny random models, seconds (what the test suite runs)
    python -m benchmarks.forward --device cuda --dtype bfloat16 --kernels triton   # a GPU: every model in bf16
    python -m benchmarks.forward --gpu-sizes --device cuda --name forward_cuda   # GPU sizes, random weights, + Llama-1B

Workloads: MiniLM encoder forward for classification (64 rows x 64 tokens of real
rotten-tomatoes reviews), SmolLM2 causal-LM prefill (16 x 64, last-token logits, as
generation does) and decode (16 rows, single-token steps on a 64-token KV cache).
Task heads are left out: they are one small GEMM per adapter for every system alike.

Systems, all on the same target layers (q, k, v, o, FFN in and out):
- bare:      the backbone alone: the serving model with its wrappers taken out and the very same
             weight tensors, so the two differ by the wrappers alone;
- dcft:      the serving model of serving/model.py: wrapped layers reading an AdapterBank
             by a per-row slot index, kernel 8, one forward for the whole batch;
- peft-lora: PEFT LoRA rank 1, one forward with PEFT's mixed-batch `adapter_names=`;
- peft-lokr: PEFT LoKr rank 1, which has no mixed path: one sub-batch per adapter after
             `set_adapter` (decode: each sub-batch keeps its own KV cache).
Row r uses adapter r mod d for d distinct adapters per batch; d is capped at the batch's
rows (the table says which asked-for counts were capped). Every variant of a workload is
timed in interleaved rounds in one process; the median of rounds is reported.

--gpu-sizes: bf16, random weights of each model's real shape (benchmarks/fixtures.py
REAL_SHAPES), MiniLM classify 256 x 128, SmolLM2 prefill 64 x 256 and decode 64 rows x 256
cached x 16 steps, Llama-3.2-1B's shape prefill 32 x 512 and decode 64 x 512 x 16; 1 and 64
distinct; bare, dcft and peft-lora, PEFT within a 20 s budget per variant; with --cuda-graphs.
--cuda-graphs: bare and dcft also replayed from CUDA graphs ("+graph"): the same GPU work without
eager mode's per-layer host cost, which dominates DCFT's mixed layers on a GPU. Decode then runs on a
static KV cache (attention over prompt + steps positions), one graph per step shape.
--peft-budget S: a PEFT variant whose one run, times its rounds, would pass S seconds is run
once, and its row says so (PEFT's mixed decode at 64 distinct takes seconds per step on a GPU).

Targets at 64 distinct (or the batch's rows if fewer): dcft >= 0.95x bare, >= 3x peft-lora.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from adapters import kernels
from adapters.config import AdapterConfig
from adapters.functional import grid_shape
from adapters.injection import remove_adapter
from adapters.targets import find_target_layers
from backbones.loading import is_causal_lm, load_tokenizer
from backbones.shipped import MINILM, SMOLLM2, resolve_model_dir
from benchmarks.graph_replay import StaticDecode, capture, slot_index_of
from benchmarks.harness import (
    Variant,
    add_timing_options,
    review_texts,
    sync_for,
    time_variants,
    timing_device,
    torch_threads,
    where_time_goes,
)
from benchmarks.report import RESULTS_DIR, write_report
from serving.bank import HostAdapter
from serving.config import EngineConfig
from serving.model import AdapterPlacement, BackboneShape, ServingModel, build_serving_model, load_serving_backbone

SYSTEMS = ("bare", "dcft", "peft-lora", "peft-lokr")
GRAPHED = ("bare+graph", "dcft+graph")  # --cuda-graphs: replayed from CUDA graphs
TARGET_DISTINCT, TARGET_VS_BARE, TARGET_VS_LORA = 64, 0.95, 3.0
COLUMNS = ["workload", "system", "distinct", "asked", "runs", "ms_per_run", "tokens_per_s", "vs_bare",
           "dcft_vs_lora"]
# --gpu-sizes: model (a REAL_SHAPES name) -> its workloads as (kind, rows, tokens, decode steps)
GPU_SIZES = {
    "minilm": [("classify", 256, 128, 0)],
    "smollm2": [("prefill", 64, 256, 0), ("decode", 64, 256, 16)],
    "llama-1b": [("prefill", 32, 512, 0), ("decode", 64, 512, 16)],
}
# --kernels -> adapters.kernels mode: how DCFT's mixed layers run on CUDA (the CPU always runs its C++ kernel)
KERNEL_MODES = {"triton": "expand", "triton-fused": "fused", "torch": "torch"}


@dataclass(frozen=True)
class Workload:
    name: str
    kind: str  # classify | prefill | decode
    batch: int  # rows
    tokens: int  # per row: the sequence, or (decode) the prompt already in the KV cache
    steps: int = 0  # decode: single-token steps per timed run

    @property
    def tokens_per_run(self) -> int:
        return self.batch * (self.steps if self.kind == "decode" else self.tokens)


@dataclass(frozen=True)
class Batch:
    inputs: dict[str, torch.Tensor]  # input_ids, attention_mask: (rows, tokens)
    next_ids: torch.Tensor  # (rows, steps): the tokens fed one by one when decoding


@dataclass
class Part:
    """One model call's share of a batch: its rows (None: all) and how the model is set up for them."""

    model: nn.Module
    rows: torch.Tensor | None = None
    kwargs: dict = field(default_factory=dict)
    activate: Callable[[], None] = lambda: None  # the DCFT slot index, or PEFT's active adapter

    def take(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.rows is None else tensor[self.rows]


@dataclass
class Systems:
    """One loaded model per system, sharing nothing, all on the same device."""

    bare: nn.Module
    dcft: nn.Module
    bank: AdapterPlacement
    slots: list[int]  # bank slot of adapter i
    lora: nn.Module | None  # None: not asked for (--systems)
    lokr: nn.Module | None


# --- models -------------------------------------------------------------------------------------


def load_model(model_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model class the engine serves: the bare encoder, or the causal LM with its LM head."""
    return load_serving_backbone(model_dir, device, dtype)


class RandomAdapters:
    """Adapter `a<i>` made from seed i: random A, B, C on every wrapped layer, no head."""

    def __init__(self, shape: BackboneShape, kernel: int, device: torch.device):
        self.shape, self.kernel, self.device = shape, kernel, device
        task = "causal_lm" if shape.is_causal else "seq_cls"
        self.config = AdapterConfig(
            kernel_size=kernel, init="paper", task_type=task, target_layers=list(shape.layer_dims), base_model=shape.ref
        )

    def load(self, key: str) -> HostAdapter:
        gen = torch.Generator().manual_seed(int(key[1:]))
        layers = {}
        for name, (out_f, in_f) in self.shape.layer_dims.items():
            m, n = grid_shape(out_f, in_f, self.kernel, self.kernel)
            shapes = ((1, n), (m, 1), (self.kernel, self.kernel))
            layers[name] = tuple((torch.randn(shape, generator=gen) * 0.02).to(self.device) for shape in shapes)
        return HostAdapter.pack(key, self.config, layers, head=None)


def dcft_system(model_dir: Path, device: torch.device, adapters: int, kernel: int,
                dtype: torch.dtype = torch.float32) -> ServingModel:
    """What the engine serves in mixed mode, with room for `adapters` random adapters."""
    config = EngineConfig(model=str(model_dir), kernel_size=kernel, device_slots=adapters, host_capacity=adapters)
    random_adapters = functools.partial(RandomAdapters, kernel=kernel, device=device)
    return build_serving_model(model_dir, config, random_adapters, device, dtype)


def peft_system(model_dir: Path, device: torch.device, adapters: int, kind: str,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """PEFT LoRA or LoKr, rank 1, on the layers DCFT targets, with `adapters` adapters a0, a1, ..."""
    from peft import LoKrConfig, LoraConfig, get_peft_model

    model = load_model(model_dir, device, dtype)
    targets = list(find_target_layers(model, ["all"]))
    task = "CAUSAL_LM" if is_causal_lm(model.config) else None
    if kind == "lora":
        config = LoraConfig(r=1, lora_alpha=1, target_modules=targets, task_type=task)
    else:
        config = LoKrConfig(r=1, alpha=1, target_modules=targets, task_type=task)
    peft_model = get_peft_model(model, config, adapter_name="a0")
    for i in range(1, adapters):
        peft_model.add_adapter(f"a{i}", config)
    return peft_model.eval()


def bare_twin(model: nn.Module) -> nn.Module:
    """The serving model with every DCFT wrapper taken out, sharing its weight tensors."""
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    twin = copy.deepcopy(model, memo=shared)
    remove_adapter(twin)
    return twin


def build_systems(model_dir: Path, device: torch.device, adapters: int, kernel: int,
                  dtype: torch.dtype = torch.float32, systems: Sequence[str] = SYSTEMS) -> Systems:
    dcft = dcft_system(model_dir, device, adapters, kernel, dtype)
    keys = [f"a{i}" for i in range(adapters)]
    slots = dcft.placement.acquire(keys)  # loads them all onto the device, as the engine does per batch
    peft = {kind: peft_system(model_dir, device, adapters, kind, dtype) if f"peft-{kind}" in systems else None
            for kind in ("lora", "lokr")}
    return Systems(
        bare=bare_twin(dcft.model), dcft=dcft.model, bank=dcft.placement,
        slots=[slots[k] for k in keys], **peft,
    )


# --- inputs -------------------------------------------------------------------------------------


def make_batch(model_dir: Path, texts: Sequence[str], workload: Workload, device: torch.device) -> Batch:
    """Real text, tokenised, run together and cut into full rows: no padding, every token real."""
    tokenizer = load_tokenizer(model_dir)
    per_row = workload.tokens + workload.steps
    needed, ids = workload.batch * per_row, []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= needed:
            break
    ids = (ids * (needed // max(len(ids), 1) + 1))[:needed]  # a short corpus (smoke) repeats
    grid = torch.tensor(ids, device=device).view(workload.batch, per_row)
    prompt = grid[:, : workload.tokens]
    return Batch({"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}, grid[:, workload.tokens :])


# --- variants -----------------------------------------------------------------------------------


def parts_for(system: str, systems: Systems, adapter_of_row: list[int]) -> list[Part]:
    """How each system runs a batch whose row r uses adapter adapter_of_row[r]."""
    if system == "bare":
        return [Part(systems.bare)]
    if system == "dcft":
        slots = [systems.slots[a] for a in adapter_of_row]
        device = next(systems.dcft.parameters()).device

        def use_slots() -> None:  # what the engine does per batch
            systems.bank.set_slot_index(torch.tensor(slots, device=device))

        return [Part(systems.dcft, activate=use_slots)]
    if system == "peft-lora":
        return [Part(systems.lora, kwargs={"adapter_names": [f"a{a}" for a in adapter_of_row]})]
    groups: dict[int, list[int]] = {}
    for row, adapter in enumerate(adapter_of_row):
        groups.setdefault(adapter, []).append(row)
    device = next(systems.lokr.parameters()).device
    return [
        Part(systems.lokr, torch.tensor(rows, device=device), activate=lambda a=a: systems.lokr.set_adapter(f"a{a}"))
        for a, rows in groups.items()
    ]


def forward_variant(system: str, distinct: int, parts: list[Part], workload: Workload, batch: Batch) -> Variant:
    """Classification or prefill: one forward per part over its rows."""
    extra = {"logits_to_keep": 1} if workload.kind == "prefill" else {}  # generation needs only the last logits

    def run() -> None:
        for part in parts:
            part.activate()
            part.model(**{k: part.take(v) for k, v in batch.inputs.items()}, **part.kwargs, **extra)

    return Variant(system, distinct, run)


def decode_variant(system: str, distinct: int, parts: list[Part], batch: Batch) -> Variant:
    """Single-token steps on a KV cache per part, prefilled once here; each run decodes `steps` tokens."""
    prompt_len = batch.inputs["input_ids"].shape[1]
    caches = []
    for part in parts:
        part.activate()
        cache = DynamicCache()
        part.model(**{k: part.take(v) for k, v in batch.inputs.items()}, past_key_values=cache, use_cache=True,
                   logits_to_keep=1, **part.kwargs)
        caches.append(cache)

    def run() -> None:
        for part, cache in zip(parts, caches, strict=True):
            part.activate()
            next_ids = part.take(batch.next_ids)
            for step in range(next_ids.shape[1]):
                mask = torch.ones(next_ids.shape[0], prompt_len + step + 1, dtype=torch.long, device=next_ids.device)
                part.model(input_ids=next_ids[:, step : step + 1], attention_mask=mask, past_key_values=cache,
                           use_cache=True, **part.kwargs)

    def reset() -> None:
        for cache in caches:
            if cache.get_seq_length() > prompt_len:
                cache.crop(prompt_len - cache.get_seq_length())  # transformers 5 crops by a negative count

    return Variant(system, distinct, run, reset)


def graphed_variant(system: str, distinct: int, part: Part, workload: Workload, batch: Batch) -> Variant:
    """One forward (classify, prefill) replayed from a captured CUDA graph."""
    extra = {"logits_to_keep": 1} if workload.kind == "prefill" else {}
    part.activate()
    replay = capture(lambda: part.model(**batch.inputs, **part.kwargs, **extra), keep=(slot_index_of(part.model),))
    return Variant(f"{system}+graph", distinct, replay)


def graphed_decode_variant(system: str, distinct: int, part: Part, batch: Batch) -> Variant:
    """`steps` decode steps on a static KV cache, each replayed from one captured CUDA graph."""
    part.activate()
    decode = StaticDecode(part.model, batch.inputs["input_ids"], batch.next_ids.shape[1], part.kwargs)
    decode.feed(batch.next_ids[:, :1], 0)
    replay = capture(decode.step, keep=(slot_index_of(part.model),))

    def run() -> None:
        for step in range(batch.next_ids.shape[1]):
            decode.feed(batch.next_ids[:, step : step + 1], step)
            replay()

    return Variant(f"{system}+graph", distinct, run)


def graphed(system: str, distinct: int, part: Part, workload: Workload, batch: Batch) -> list[Variant]:
    """The CUDA-graph variant of a bare or DCFT part, or none (and why) if its capture fails."""
    try:
        if workload.kind == "decode":
            return [graphed_decode_variant(system, distinct, part, batch)]
        return [graphed_variant(system, distinct, part, workload, batch)]
    except RuntimeError as err:  # a capture a model's code does not allow: the eager rows still stand
        print(f"{workload.name} {system} d={distinct}: no CUDA graph ({str(err).splitlines()[0][:200]})")
        return []


def build_variants(systems: Systems, workload: Workload, batch: Batch, distinct: list[int],
                   names: Sequence[str] = SYSTEMS, graphs: bool = False) -> list[Variant]:
    variants = []
    for system in (s for s in SYSTEMS if s in names):
        for d in [0] if system == "bare" else distinct:
            adapter_of_row = [row % max(d, 1) for row in range(workload.batch)]
            parts = parts_for(system, systems, adapter_of_row)
            if workload.kind == "decode":
                variants.append(decode_variant(system, d, parts, batch))
            else:
                variants.append(forward_variant(system, d, parts, workload, batch))
            if graphs and system in ("bare", "dcft"):
                variants += graphed(system, d, parts[0], workload, batch)
    return variants


# --- one model, its workloads -------------------------------------------------------------------


def capped(asked: Sequence[int], batch: int) -> dict[int, list[int]]:
    """Distinct counts a batch can hold -> the asked-for counts they stand for."""
    out: dict[int, list[int]] = {}
    for d in sorted(asked):
        out.setdefault(min(d, batch), []).append(d)
    return out


def within_budget(variants: list[Variant], budget_s: float | None, rounds: int,
                  device: torch.device) -> tuple[list[Variant], dict[tuple[str, int], float]]:
    """The variants to time in rounds, and the PEFT ones run once instead: their one run's seconds.

    A PEFT variant whose one run, times its rounds and warm-up, would pass `budget_s` is run once."""
    if budget_s is None:
        return variants, {}
    sync, kept, once = sync_for(device), [], {}
    for variant in variants:
        if variant.system.startswith("peft"):
            variant.reset()
            sync()
            start = time.perf_counter()
            variant.run()
            sync()
            took = time.perf_counter() - start
            if took * (rounds + 1) > budget_s:
                once[(variant.system, variant.distinct)] = took
                continue
        kept.append(variant)
    return kept, once


def result_rows(workload: Workload, variants: list[Variant], seconds: list[float], asked: dict,
                rounds: int, once: dict[tuple[str, int], float]) -> list[dict]:
    by_key = {(v.system, v.distinct): s for v, s in zip(variants, seconds, strict=True)} | once
    bare = by_key[("bare", 0)]
    rows = []
    for (system, d), s in by_key.items():
        lora = by_key.get(("peft-lora", d))
        rows.append({
            "workload": workload.name, "system": system, "distinct": d,
            "asked": ", ".join(map(str, asked.get(d, []))) if asked.get(d, [d]) != [d] else None,
            "runs": 1 if (system, d) in once else rounds,
            "ms_per_run": s * 1e3, "tokens_per_s": workload.tokens_per_run / s, "vs_bare": bare / s,
            "dcft_vs_lora": lora / s if system == "dcft" and lora else None,
        })
    return rows


def run_model(model_dir: Path, workloads: list[Workload], texts: Sequence[str], args, device) -> tuple[list, list]:
    """Every workload on one backbone: rows for the report, and profiles of the ones short of target."""
    plans = {w.name: capped(args.distinct, w.batch) for w in workloads}
    adapters = max(max(plan) for plan in plans.values())
    start = time.perf_counter()
    systems = build_systems(model_dir, device, adapters, args.kernel, getattr(torch, args.dtype), args.systems)
    print(f"{model_dir.name}: {len(args.systems)} systems with {adapters} adapters each built in "
          f"{time.perf_counter() - start:.0f} s")
    rows, profiles = [], []
    with torch.inference_mode():
        for workload in workloads:
            batch = make_batch(model_dir, texts, workload, device)
            variants = build_variants(systems, workload, batch, list(plans[workload.name]), args.systems,
                                      args.cuda_graphs)
            variants, once = within_budget(variants, args.peft_budget, args.rounds, device)
            seconds = time_variants(variants, args.rounds, device, args.clock)
            rows += result_rows(workload, variants, seconds, plans[workload.name], args.rounds, once)
            print_rows(rows[-len(variants) - len(once) :])
            target = target_row(rows, workload)
            if target["vs_bare"] < TARGET_VS_BARE:
                pick = {(v.system, v.distinct): (v, s) for v, s in zip(variants, seconds, strict=True)}
                (bare, bare_s), (dcft, dcft_s) = pick[("bare", 0)], pick[("dcft", target["distinct"])]
                profile = where_time_goes(bare, dcft, (bare_s, dcft_s), device)
                profiles.append((workload.name, target["distinct"], profile))
    return rows, profiles


def graph_line(rows: list[dict], workload: Workload) -> str | None:
    """dcft+graph against bare+graph at the target distinct count, when both were timed."""
    d = min(TARGET_DISTINCT, workload.batch)
    pick = {(r["system"], r["distinct"]): r for r in rows if r["workload"] == workload.name}
    bare, dcft = pick.get(("bare+graph", 0)), pick.get(("dcft+graph", d))
    if not (bare and dcft):
        return None
    return (f"- {workload.name}, both from CUDA graphs, dcft at {d} distinct: "
            f"{bare['ms_per_run'] / dcft['ms_per_run']:.3f}x bare ({dcft['vs_bare']:.2f}x eager bare)")


def target_row(rows: list[dict], workload: Workload) -> dict:
    d = min(TARGET_DISTINCT, workload.batch)
    return next(r for r in rows if r["workload"] == workload.name and r["system"] == "dcft" and r["distinct"] == d)


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        ratio = f"  dcft/lora {r['dcft_vs_lora']:.2f}x" if r["dcft_vs_lora"] else ""
        ratio += "  (one run: over the PEFT budget)" if r["runs"] == 1 else ""
        print(f"{r['workload']:18} {r['system']:9} d={r['distinct']:<4} {r['ms_per_run']:9.1f} ms "
              f"{r['tokens_per_s']:9.0f} tok/s  {r['vs_bare']:.3f}x bare{ratio}")


# --- report -------------------------------------------------------------------------------------


def plot(rows: list[dict], path: Path) -> None:
    """Tokens/s against distinct adapters per batch, one panel per workload, bare as a flat line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    fig, axes = plt.subplots(1, len(workloads), figsize=(5 * len(workloads), 4), squeeze=False)
    for ax, name in zip(axes[0], workloads, strict=True):
        mine = [r for r in rows if r["workload"] == name]
        bare = next(r["tokens_per_s"] for r in mine if r["system"] == "bare")
        ax.axhline(bare, color="black", linestyle="--", label="bare")
        for system in SYSTEMS[1:] + GRAPHED:
            points = sorted((r["distinct"], r["tokens_per_s"]) for r in mine if r["system"] == system)
            if points:
                    ax.plot(*zip(*points, strict=True), marker="o", label=system)
        ticks = sorted({r["distinct"] for r in mine if r["distinct"]})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set(title=name, xlabel="distinct adapters per batch", ylabel="tokens/s", ylim=(0, None))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def target_lines(rows: list[dict], workloads: list[Workload]) -> list[str]:
    lines = []
    for workload in workloads:
        graphed = graph_line(rows, workload)
        lines += [graphed] if graphed else []
        row = target_row(rows, workload)
        vs_bare, vs_lora = row["vs_bare"], row["dcft_vs_lora"]
        versus_lora = (f", {vs_lora:.2f}x peft-lora ({'met' if vs_lora >= TARGET_VS_LORA else 'missed'}, "
                       f"target {TARGET_VS_LORA})" if vs_lora else "")
        lines.append(
            f"- {workload.name}, dcft at {row['distinct']} distinct: {vs_bare:.3f}x bare "
            f"({'met' if vs_bare >= TARGET_VS_BARE else 'missed'}, target {TARGET_VS_BARE}){versus_lora}"
        )
    return lines


PROFILE_LEGEND = (
    "What the dcft path adds per target layer: one `dcft::mixed_linear` op (adapters/kernels/ops.py) in place "
    "of nn.Linear's one op. On the CPU its fused C++ kernel runs the frozen GEMM and adds each token's update "
    "in place, reading its slot's A, B, C from the bank; on CUDA it runs `_shrink_kernel`, cuBLAS and "
    "`_expand_kernel` (or one `_linear_dcft_kernel`), and the host table shows what launching them costs. A "
    "timed gap the op totals do not show is per-call overhead outside the ops (Python, the dispatcher)."
)


def machine(args) -> str:
    import platform

    import transformers

    device = timing_device(args)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'host'})"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    if device.type == "cuda":
        import triton

        versions += f", triton {triton.__version__}"
    return f"{where}, {versions}"


def weights(args) -> str:
    if args.smoke:
        return "tiny random models"
    if args.random_weights:
        return "random, in each model's real shape (llama-1b: Llama-3.2-1B's shape)"
    return "real (MiniLM, SmolLM2-135M)"


def notes(args, workloads: list[Workload], rows: list[dict], profiles: list, load: float) -> str:
    sizes = "; ".join(
        f"{w.name} {w.batch} rows x {w.tokens} tokens" + (f", {w.steps} steps per run" if w.steps else "")
        for w in workloads
    )
    text = [
        f"Ran on {machine(args)}. Weights: {weights(args)}.",
        "",
        f"Sizes: {sizes}. Kernel {args.kernel}, rank 1, all target layers, {args.dtype}, DCFT's CUDA kernels: "
        f"{args.kernels} (the CPU always runs the op's C++ kernel). Median of {args.rounds} interleaved "
        f"rounds ({args.clock} clock); vs_bare = bare time / this time; dcft_vs_lora = peft-lora time / dcft "
        f"time at equal distinct. `asked` lists the distinct counts capped at the batch's rows. 1-minute load "
        f"average at start: {load:.1f}.",
        "",
        "Targets:",
        *target_lines(rows, workloads),
        "",
        f"Regenerate: `{args.command}`; plot: `{args.name}.png`.",
    ]
    if profiles:
        text += ["", "## Where the time goes", "", PROFILE_LEGEND]
        for name, d, table in profiles:
            text += ["", f"**{name}**, dcft at {d} distinct vs bare: {table}"]
    return "\n".join(text)


# --- entry point --------------------------------------------------------------------------------


def plan_models(args) -> list[tuple[str, list[Workload]]]:
    """(model, its workloads) in the order they run; models without asked-for workloads left out."""
    if args.gpu_sizes:
        plan = [(model, [Workload(f"{model} {kind}", kind, *size) for kind, *size in sizes])
                for model, sizes in GPU_SIZES.items()]
    else:
        lm = [Workload("smollm2 prefill", "prefill", args.lm_batch, args.lm_tokens),
              Workload("smollm2 decode", "decode", args.lm_batch, args.lm_tokens, args.decode_steps)]
        plan = [(args.model, [Workload("minilm classify", "classify", args.batch, args.tokens)]), (args.lm_model, lm)]
    plan = [(model, [w for w in workloads if w.kind in args.workloads]) for model, workloads in plan]
    return [(model, workloads) for model, workloads in plan if workloads]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=MINILM, help="encoder backbone (alias or folder)")
    parser.add_argument("--lm-model", default=SMOLLM2, help="causal LM backbone (alias or folder)")
    parser.add_argument("--workloads", nargs="+", default=["classify", "prefill", "decode"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--lm-batch", type=int, default=16)
    parser.add_argument("--lm-tokens", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--distinct", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--kernel", type=int, default=8)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="backbone, bank and PEFT adapters")
    parser.add_argument("--kernels", choices=sorted(KERNEL_MODES), default="triton",
                        help="DCFT mixed layers on CUDA: the fused Triton kernels or the torch path")
    add_timing_options(parser)
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS[1:], default=None,
                        help="systems timed beside bare (default: all; --gpu-sizes: dcft, peft-lora)")
    parser.add_argument("--peft-budget", type=float, default=None, help="seconds per PEFT variant (see above)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also time bare and dcft replayed from CUDA graphs (CUDA only)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights of the models' real shapes (--model/--lm-model name REAL_SHAPES)")
    parser.add_argument("--gpu-sizes", action="store_true", help="the GPU preset above")
    parser.add_argument("--smoke", action="store_true", help="tiny random models and sizes, for tests")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument("--name", default="forward", help="report file name (e.g. forward_512 for a wide batch)")
    args = parser.parse_args(argv)
    args.command = " ".join(["python -m benchmarks.forward", *(sys.argv[1:] if argv is None else argv)])
    if args.smoke:
        args.batch, args.tokens, args.lm_batch, args.lm_tokens = 4, 16, 4, 8
        args.decode_steps, args.distinct, args.rounds = 2, [1, 8], 1
        args.threads = args.threads or 1  # tiny models gain nothing from threads and stall on a busy machine
    if args.smoke and args.name == "forward":
        args.name = "forward_smoke"
    if args.gpu_sizes:
        args.random_weights, args.distinct, args.dtype = True, [1, 64], "bfloat16"
        args.systems, args.peft_budget = args.systems or ["dcft", "peft-lora"], args.peft_budget or 20.0
        args.cuda_graphs = True
    args.systems = ["bare", *(args.systems or SYSTEMS[1:])]
    if args.cuda_graphs and not (args.device or "").startswith("cuda"):
        raise SystemExit("--cuda-graphs needs --device cuda")
    return args


def tiny_models(root: Path) -> tuple[Path, Path]:
    """Random BERT and Llama folders (benchmarks/fixtures.py), so --smoke needs no real weights."""
    from benchmarks.fixtures import tiny_bert_dir, tiny_llama_dir

    return tiny_bert_dir(root / "bert"), tiny_llama_dir(root / "llama")


def model_dir_for(model: str, args, device: torch.device, tmp: Path) -> Path:
    if not args.random_weights:
        return resolve_model_dir(model)
    from benchmarks.fixtures import REAL_SHAPES, random_model_dir

    if model not in REAL_SHAPES:
        raise SystemExit(f"--random-weights builds one of {sorted(REAL_SHAPES)}, not '{model}'")
    return random_model_dir(model, tmp / model, device)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device, load = timing_device(args), os.getloadavg()[0]
    with torch_threads(args.threads), kernels.using(KERNEL_MODES[args.kernels]), tempfile.TemporaryDirectory() as tmp:
        if args.smoke:
            from benchmarks.fixtures import CORPUS

            texts, (args.model, args.lm_model) = CORPUS, tiny_models(Path(tmp))
        elif args.random_weights:
            from benchmarks.fixtures import CORPUS

            texts = CORPUS  # the tiny tokenizer's text: random weights make the values moot
        else:
            texts = review_texts("train")
        plan = plan_models(args)
        rows, profiles = [], []
        for model, workloads in plan:
            model_dir = model_dir_for(model, args, device, Path(tmp))
            more_rows, more_profiles = run_model(model_dir, workloads, texts, args, device)
            rows, profiles = rows + more_rows, profiles + more_profiles
        workloads = [w for _, model_workloads in plan for w in model_workloads]
        args.out.mkdir(parents=True, exist_ok=True)
        plot(rows, args.out / f"{args.name}.png")
        title = "Whole-model throughput with mixed-adapter batches: bare vs DCFT vs PEFT"
        path = write_report(args.name, title, rows, COLUMNS, notes(args, workloads, rows, profiles, load), args.out)
    print("\n".join(target_lines(rows, workloads)))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
