"""Microbenchmark: one target linear layer, bare vs DCFT factored vs a 64-adapter mixed batch.

    python -m benchmarks.layer            # full size: batch 64 x 128 tokens
    python -m benchmarks.layer --smoke    # tiny, seconds (what the test suite runs)

All variants are timed in interleaved rounds in one process and reported as
ratios to the bare layer (median of rounds). Target: mixed <= 1.05x bare on CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from adapters.config import DCFTConfig
from adapters.functional import grid_shape
from adapters.layer import DCFTLinear, LayerBank, SlotBatch
from backbones.loading import pick_device
from benchmarks.report import write_report

# (model, layer role, out, in) of the real backbones' target layers
LAYER_SHAPES = [
    ("MiniLM", "q/k/v/o", 384, 384),
    ("MiniLM", "ffn_in", 1536, 384),
    ("MiniLM", "ffn_out", 384, 1536),
    ("SmolLM2", "q/o", 576, 576),
    ("SmolLM2", "k/v", 192, 576),
    ("SmolLM2", "ffn_in", 1536, 576),
    ("SmolLM2", "ffn_out", 576, 1536),
]


def build_variants(out_f: int, in_f: int, adapters: int, kernel: int, device: torch.device) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    bare = nn.Linear(in_f, out_f).to(device)
    config = DCFTConfig(kernel_size=kernel, init="paper")
    factored = DCFTLinear(bare, config).to(device)
    mixed = DCFTLinear(bare).to(device)
    batch = SlotBatch()
    mixed.bank = LayerBank.empty(adapters + 1, grid_shape(out_f, in_f, kernel, kernel), kernel, 1, batch, device=device)
    for slot in range(1, adapters + 1):
        mixed.bank.write_slot(
            slot, *(torch.randn_like(p) * 0.02 for p in (factored.dcft_A, factored.dcft_B, factored.dcft_C)), 1.0
        )
    return {"bare": bare, "factored": factored, "mixed": mixed}


def time_variants(
    variants: dict[str, nn.Module], x: torch.Tensor, rounds: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per forward, variants interleaved so drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for layer in variants.values():  # warm-up
            layer(x)
        for _ in range(rounds):
            for name, layer in variants.items():
                sync()
                start = time.perf_counter()
                layer(x)
                sync()
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def run(batch: int, tokens: int, adapters: int, kernel: int, rounds: int, shapes=LAYER_SHAPES) -> list[dict]:
    device = pick_device()
    rows = []
    for model, role, out_f, in_f in shapes:
        variants = build_variants(out_f, in_f, adapters, kernel, device)
        variants["mixed"].bank.batch.slot_index = torch.arange(1, batch + 1, device=device) % (adapters + 1)
        x = torch.randn(batch, tokens, in_f, device=device)
        t = time_variants(variants, x, rounds, device)
        rows.append({
            "model": model, "layer": role, "shape": f"{out_f}x{in_f}", "bare_ms": t["bare"] * 1e3,
            "factored_x": t["factored"] / t["bare"], "mixed_x": t["mixed"] / t["bare"],
        })
        print(f"{model:8} {role:8} {out_f:5}x{in_f:<5} bare {t['bare'] * 1e3:7.2f} ms  "
              f"factored {rows[-1]['factored_x']:.3f}x  mixed({adapters}) {rows[-1]['mixed_x']:.3f}x")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--kernel", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for tests")
    parser.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.tokens, args.adapters, args.rounds = 4, 8, 4, 2
    rows = run(args.batch, args.tokens, args.adapters, args.kernel, args.rounds)
    notes = (f"batch {args.batch} x {args.tokens} tokens, kernel {args.kernel}, {args.adapters} distinct adapters "
             f"in the mixed batch, median of {args.rounds} interleaved rounds; ratios are to the bare nn.Linear.\n"
             "Regenerate: `python -m benchmarks.layer`.")
    kwargs = {"out_dir": __import__("pathlib").Path(args.out)} if args.out else {}
    name = "layer_smoke" if args.smoke else "layer"
    path = write_report(name, "DCFT target-layer microbenchmark", rows,
                        ["model", "layer", "shape", "bare_ms", "factored_x", "mixed_x"], notes, **kwargs)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
