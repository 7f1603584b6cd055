"""The decode step against the bare model: what serving adapters costs a causal LM per step.

    python -m benchmarks decode                       # real SmolLM2-135M on this machine's device
    python -m benchmarks decode --smoke               # a tiny random Llama, seconds (what the tests run)
    python -m benchmarks decode --device cuda --dtype bfloat16 --mode graphs   # a GPU, steps replayed
    python -m benchmarks decode --mode compile --shapes 8x128 32x512 --name decode_compiled   # CPU, compiled

Every variant runs the serving decoder's own model runner (serving/runner.py: the slotted KV cache,
one indexed write per step, each row masked to its own positions), so the rows differ only in the
model and the adapters:
- bare:    the bare backbone, built from the serving model with every wrapper taken out and the
           very same weight tensors: the two differ by the wrappers alone, not by where their
           weights happen to sit in memory;
- dcft-0:  the serving model (every target layer wrapped, 64 adapters resident), every row on the
           bare slot: the step runs the bare layers (no slot index is set);
- dcft-64: the same model, row r on adapter r mod 64 (distinct adapters: min(rows, 64));
and, for scale, `bare-hf`: the bare model in transformers' own decode loop (a DynamicCache, its own
causal mask), so the runner's bare step can be read against what a plain transformers user gets.
Rows x context: 1, 8 and 32 rows with 128 and 512 tokens already in the cache; a timed run is
`--steps` single-token steps from there. Variants are timed in interleaved rounds; `vs_bare` is the
median over rounds of the round's bare time over the variant's, with its quartiles beside it.

The dispatch table counts the ops one step of 8 rows dispatches (benchmarks/dispatch.py), and one
classify batch of the MiniLM encoder (8 x 32 tokens), bare against wrapped: the host work eager mode
pays per op whatever its math. Goal: >= 0.95x bare at 64 distinct adapters; <= 2 ops per wrapped layer.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from backbones.shipped import MINILM, SMOLLM2, resolve_model_dir
from benchmarks.dispatch import DispatchCounter
from benchmarks.fixtures import random_model_dir, tiny_bert_dir, tiny_llama_dir
from benchmarks.forward import bare_twin, dcft_system, load_model
from benchmarks.harness import Variant, add_timing_options, paired_speed, timed_rounds, timing_device, torch_threads
from benchmarks.report import RESULTS_DIR, markdown_table, write_report
from serving.engine import DTYPES
from serving.model import ServingModel
from serving.runner import ModelRunner

ADAPTERS, KERNEL, TARGET = 64, 8, 0.95
MODES = {"eager": "run eagerly", "graphs": "replayed from CUDA graphs", "compile": "compiled by torch.compile"}
SHAPES = [(1, 128), (8, 128), (32, 128), (1, 512), (8, 512), (32, 512)]  # (rows, context)
COLUMNS = ["rows", "context", "system", "distinct", "ms_per_step", "tokens_per_s", "vs_bare", "quartiles"]
DISPATCH_COLUMNS = ["workload", "system", "ops", "wrapped_layers", "extra_per_layer", "top_extra_ops"]


def runner_for(model: nn.Module, serving: ServingModel | None, device: torch.device, dtype: torch.dtype,
               rows: int, positions: int, mode: str = "eager") -> ModelRunner:
    """The decoder's runner on `model` (mode: eager, graphs or compile); a bare model has no placement."""
    set_slot_index = serving.placement.set_slot_index if serving else (lambda index: None)
    return ModelRunner(model, set_slot_index, threading.Lock(), device, dtype, rows, positions,
                       graphs=mode == "graphs", compile=mode == "compile")


def make_runners(systems: tuple[nn.Module, ServingModel, list[int]], device: torch.device, dtype: torch.dtype,
                 rows: int, positions: int, mode: str) -> dict[str, ModelRunner]:
    """One runner per system, kept for every shape: a compiled step or a captured graph is made once."""
    bare, serving, _ = systems
    return {"bare": runner_for(bare, None, device, dtype, rows, positions, mode),
            "dcft-0": runner_for(serving.model, serving, device, dtype, rows, positions, mode),
            f"dcft-{ADAPTERS}": runner_for(serving.model, serving, device, dtype, rows, positions, mode)}


def decode_variant(name: str, distinct: int, runner: ModelRunner, slots: Sequence[int], context: int,
                   steps: int) -> Variant:
    """`steps` decode steps of every row from `context` prompt tokens, prefilled once here."""
    rows = len(slots)
    gen = torch.Generator().manual_seed(0)
    for row in range(rows):
        prompt = torch.randint(0, min(1000, runner.model.config.vocab_size), (context,), generator=gen).tolist()
        runner.prefill(row, prompt, 0, slots[row])
    tokens = [7] * rows

    def run() -> None:
        for step in range(steps):
            runner.decode(tokens, [context + step] * rows, slots)

    return Variant(name, distinct, run)


def transformers_variant(model: nn.Module, rows: int, context: int, steps: int) -> Variant:
    """The bare model stepping on transformers' DynamicCache (cropped back after each run)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, min(1000, model.config.vocab_size), (rows, context), generator=gen).to(device)
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    tokens = torch.full((rows, 1), 7, device=device)

    @torch.inference_mode()
    def run() -> None:
        for _ in range(steps):
            model(input_ids=tokens, past_key_values=cache, use_cache=True)

    def reset() -> None:
        if cache.get_seq_length() > context:
            cache.crop(context - cache.get_seq_length())  # transformers 5 crops by a negative count

    return Variant("bare-hf", 0, run, reset)


def shape_rows(rows: int, context: int, steps: int, rounds: int, systems: tuple[nn.Module, ServingModel, list[int]],
               runners: dict[str, ModelRunner], device: torch.device, clock: str, mode: str) -> list[dict]:
    bare, _, adapter_slots = systems
    slots = [adapter_slots[row % ADAPTERS] for row in range(rows)]
    variants = [decode_variant(name, min(rows, ADAPTERS) if name.endswith(str(ADAPTERS)) else 0, runner,
                               slots if name.endswith(str(ADAPTERS)) else [0] * rows, context, steps)
                for name, runner in runners.items()]
    if mode == "eager":
        variants.append(transformers_variant(bare, rows, context, steps))
    samples = timed_rounds(variants, rounds, device, clock)
    out = []
    for variant, times, (speed, low, high) in zip(variants, samples, paired_speed(samples), strict=True):
        took = statistics.median(times)
        out.append({"rows": rows, "context": context, "system": variant.system, "distinct": variant.distinct,
                    "ms_per_step": 1000 * took / steps, "tokens_per_s": rows * steps / took,
                    "vs_bare": speed, "quartiles": f"{low:.3f}–{high:.3f}"})
    print(" ".join(f"{r['system']} {r['ms_per_step']:.1f} ms ({r['vs_bare']:.3f}x)" for r in out),
          f"<- {rows} rows x {context}")
    return out


# --- dispatch counts ----------------------------------------------------------------------------


def counted(call: Callable[[], object]) -> DispatchCounter:
    with torch.inference_mode(), DispatchCounter() as counter:
        call()
    return counter


def dispatch_row(workload: str, system: str, counter: DispatchCounter, bare: DispatchCounter, layers: int) -> dict:
    extra = counter.counts - bare.counts
    return {"workload": workload, "system": system, "ops": counter.total, "wrapped_layers": layers,
            "extra_per_layer": (counter.total - bare.total) / layers if layers else 0.0,
            "top_extra_ops": ", ".join(f"{op} {n}" for op, n in extra.most_common(4)) or "–"}


def decode_dispatches(model_dir: Path, device: torch.device, dtype: torch.dtype,
                      systems: tuple[nn.Module, ServingModel, list[int]], rows: int = 8) -> list[dict]:
    bare, serving, adapter_slots = systems
    layers = len(serving.shape.layer_dims)
    slots = [adapter_slots[row % ADAPTERS] for row in range(rows)]
    counts = {}
    for name, model, serving_or_none, row_slots in [("bare", bare, None, [0] * rows),
                                                    ("dcft-0", serving.model, serving, [0] * rows),
                                                    (f"dcft-{ADAPTERS}", serving.model, serving, slots)]:
        runner = runner_for(model, serving_or_none, device, dtype, rows, 64)
        for row in range(rows):
            runner.prefill(row, [5, 6, 7], 0, row_slots[row])
        counts[name] = counted(lambda r=runner, s=row_slots: r.decode([7] * rows, [3] * rows, s))
    workload = f"decode step, {rows} rows"
    return [dispatch_row(workload, name, c, counts["bare"], 0 if name == "bare" else layers)
            for name, c in counts.items()]


def classify_dispatches(model_dir: Path, device: torch.device, dtype: torch.dtype) -> list[dict]:
    bare = load_model(model_dir, device, dtype)
    serving, slots = loaded_system(model_dir, device, dtype)
    layers = len(serving.shape.layer_dims)
    ids = torch.randint(0, min(1000, bare.config.vocab_size), (8, 32), device=device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    counts = {"bare": counted(lambda: bare(**inputs))}
    serving.placement.set_slot_index(None)
    counts["dcft-0"] = counted(lambda: serving.model(**inputs))
    serving.placement.set_slot_index(torch.tensor([slots[r] for r in range(8)], device=device))
    counts[f"dcft-{ADAPTERS}"] = counted(lambda: serving.model(**inputs))
    serving.placement.set_slot_index(None)
    return [dispatch_row("classify, 8 x 32 tokens", name, c, counts["bare"], 0 if name == "bare" else layers)
            for name, c in counts.items()]


def loaded_system(model_dir: Path, device: torch.device, dtype: torch.dtype) -> tuple[ServingModel, list[int]]:
    """The serving model with 64 random adapters on the device; their slots."""
    serving = dcft_system(model_dir, device, ADAPTERS, KERNEL, dtype)
    keys = [f"a{i}" for i in range(ADAPTERS)]
    placed = serving.placement.acquire(keys)
    return serving, [placed[key] for key in keys]


# --- main ---------------------------------------------------------------------------------------


def model_dirs(args: argparse.Namespace, tmp: Path, device: torch.device) -> tuple[Path, Path, list]:
    """(causal LM folder, encoder folder, shapes) for --smoke, --random-weights or the real models."""
    shapes = [tuple(int(n) for n in shape.split("x")) for shape in args.shapes] if args.shapes else SHAPES
    if args.smoke:
        args.rounds, args.steps = 1, 2
        return tiny_llama_dir(tmp / "llama"), tiny_bert_dir(tmp / "bert"), [(1, 16), (4, 16)]
    if args.random_weights or args.lm != "smollm2":
        return random_model_dir(args.lm, tmp / args.lm, device), random_model_dir("minilm", tmp / "minilm", device), \
            shapes
    return resolve_model_dir(SMOLLM2), resolve_model_dir(MINILM), shapes


def weights(args: argparse.Namespace) -> str:
    if args.smoke:
        return "tiny random models"
    if args.random_weights or args.lm != "smollm2":
        return f"random weights in {args.lm}'s and MiniLM's real shapes"
    return "real SmolLM2-135M and MiniLM weights"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks decode", description=__doc__.split("\n\n")[0])
    add_timing_options(parser)
    parser.add_argument("--smoke", action="store_true", help="tiny random models, 1 round (the tests)")
    parser.add_argument("--steps", type=int, default=4, help="decode steps per timed run")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--mode", choices=["eager", "graphs", "compile"], default="eager",
                        help="how every runner steps: eagerly, replayed from CUDA graphs, or torch.compile'd")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="ROWSxCONTEXT",
                        help="the shapes to time (default: 1, 8 and 32 rows at contexts 128 and 512)")
    parser.add_argument("--lm", choices=["smollm2", "llama-1b"], default="smollm2",
                        help="the causal LM: the shipped SmolLM2, or Llama-3.2-1B's shape with random weights")
    parser.add_argument("--random-weights", action="store_true", help="random weights in the models' real shapes")
    parser.add_argument("--name", default="decode")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    parser.set_defaults(rounds=7)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Path:
    args = parse(argv)
    device, dtype = timing_device(args), DTYPES[args.dtype]
    with tempfile.TemporaryDirectory() as tmp, torch_threads(args.threads):
        lm_dir, encoder_dir, shapes = model_dirs(args, Path(tmp), device)
        serving, slots = loaded_system(lm_dir, device, dtype)
        systems = (bare_twin(serving.model), serving, slots)
        runners = make_runners(systems, device, dtype, max(r for r, _ in shapes),
                               max(c for _, c in shapes) + args.steps + 2, args.mode)
        rows = [row for shape in shapes for row in shape_rows(*shape, args.steps, args.rounds, systems, runners,
                                                               device, args.clock, args.mode)]
        del runners
        dispatches = decode_dispatches(lm_dir, device, dtype, systems) + classify_dispatches(encoder_dir, device,
                                                                                              dtype)
    where = (f"{device.type} ({torch.cuda.get_device_name(0) if device.type == 'cuda' else 'CPU'}), {args.dtype}, "
             f"{weights(args)}, "
             f"{torch.get_num_threads()} threads, steps {MODES[args.mode]}")
    notes = (f"What ran where: {where}. Kernel {KERNEL}, every attention and FFN layer wrapped, {ADAPTERS} "
             f"random adapters resident; {args.steps} steps per timed run, median of {args.rounds} interleaved "
             f"rounds. Goal at {ADAPTERS} distinct: >= {TARGET}x bare.\n\n## Dispatched ops\n\n"
             + markdown_table(dispatches, DISPATCH_COLUMNS) + "\n\n## Decode steps")
    path = write_report(args.name, "Decode step: the serving runner, bare model vs DCFT", rows, COLUMNS, notes,
                        out_dir=args.out)
    print(path.read_text())
    return path


if __name__ == "__main__":
    main()
