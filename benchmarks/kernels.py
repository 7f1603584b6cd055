"""Kernel microbenchmark: one mixed DCFT layer on CUDA, the torch path vs the Triton kernels.

    python -m benchmarks.kernels                       # CUDA, bf16: the issue's shapes and batch sizes
    python -m benchmarks.kernels --dtype float32 --models minilm
    python -m benchmarks.kernels --smoke               # CPU: Triton's interpreter at tiny sizes (the script runs)

Per target-layer shape of MiniLM, SmolLM2-135M and a Llama-1B-shaped model (random weights
throughout: the layer's cost does not depend on its values), and per workload's token count
(classify / prefill batches, decode rows of one token), with 64 distinct adapters in the batch:
- bare:          nn.Linear (cuBLAS, bias in its epilogue);
- torch:         the mixed layer's pure-torch path (adapters/functional.py: gather rows, x @ G, spread, addmm_);
- triton-expand: shrink kernel + cuBLAS GEMM + one in-place expand-add kernel (adapters/kernels, default mode);
- triton-fused:  shrink kernel + a Triton GEMM whose epilogue adds bias and the DCFT update;
- triton-graph:  decode only, triton-expand captured in a CUDA graph (what launch overhead costs).
Ratios are bare time / this time (1.0 = the bare layer's speed), median of interleaved rounds,
each round `repeat` calls. Every Triton variant is first checked against the torch path.
The --smoke run checks that the script runs; its times are the interpreter's and mean nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from adapters import kernels
from adapters.functional import grid_shape
from adapters.kernels import ops
from adapters.layer import DCFTLinear, LayerBank, SlotBatch
from benchmarks.harness import Variant, time_variants
from benchmarks.report import RESULTS_DIR, write_report
from serving.graphs import capture

# model -> (out, in) of its target layers, and its workloads: (name, rows, tokens per row)
MODELS = {
    "minilm": ([("q/k/v/o", 384, 384), ("ffn_in", 1536, 384), ("ffn_out", 384, 1536)],
               [("classify", 256, 128)]),
    "smollm2": ([("q/o", 576, 576), ("k/v", 192, 576), ("ffn_in", 1536, 576), ("ffn_out", 576, 1536)],
                [("prefill", 64, 256), ("decode", 64, 1)]),
    "llama-1b": ([("q/o", 2048, 2048), ("k/v", 512, 2048), ("ffn_in", 8192, 2048), ("ffn_out", 2048, 8192)],
                 [("prefill", 32, 512), ("decode", 64, 1)]),
}
SMOKE_MODELS = {"tiny": ([("a", 64, 32), ("b", 32, 64)], [("prefill", 4, 8), ("decode", 4, 1)])}
SYSTEMS = ("bare", "torch", "triton-expand", "triton-fused", "triton-graph")
COLUMNS = ["model", "layer", "shape", "workload", "tokens", "dtype", "bare_ms", *(f"{s}_x" for s in SYSTEMS[1:]),
           "expand_err", "fused_err"]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}  # relative error vs the torch path


def mixed_layer(out_f: int, in_f: int, adapters: int, kernel: int, device: torch.device,
                dtype: torch.dtype) -> DCFTLinear:
    """A frozen nn.Linear wrapped with a bank of `adapters` random adapters (slot 0 bare)."""
    torch.manual_seed(0)
    layer = DCFTLinear(nn.Linear(in_f, out_f)).to(device=device, dtype=dtype)
    grid = grid_shape(out_f, in_f, kernel, kernel)
    layer.bank = LayerBank.empty(adapters + 1, grid, kernel, 1, SlotBatch(), device=device, dtype=dtype)
    m, n = grid
    for slot in range(1, adapters + 1):
        A, B, C = torch.randn(1, n) / n**0.5, torch.randn(m, 1), torch.randn(kernel, kernel) / kernel
        layer.bank.write_slot(slot, A, B, C, 1.0)
    return layer


def kernel_call(layer: DCFTLinear, x: torch.Tensor, fused: bool) -> Callable[[], torch.Tensor]:
    """What the layer's CUDA dispatch runs, called directly (so --smoke reaches it on CPU tensors)."""
    bank, flat = layer.bank, x.reshape(-1, layer.in_features)
    args = (flat, layer.base_weight_t, layer.base.bias, bank.A, bank.B, bank.C, bank.scale, bank.batch.slot_index)
    shape = (*x.shape[:-1], layer.out_features)
    return lambda: kernels.mixed_linear(*args, x.shape[1], fused=fused).view(shape)


def torch_call(layer: DCFTLinear, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """The op's torch reference (adapters/functional.py), what `DCFT_KERNELS=torch` runs on CUDA."""
    bank = layer.bank
    args = (x, layer.base.weight, layer.base.bias, bank.A, bank.B, bank.C, bank.scale, bank.batch.slot_index)

    def run() -> torch.Tensor:
        return ops.reference(*args)

    return run


def graph_call(call: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`call` replayed from a CUDA graph (its inputs stay put; autotuning is done by the warm-up)."""
    graph, out = capture(call, warmups=3)
    return lambda: (graph.replay(), out)[1]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def calls_for(layer: DCFTLinear, x: torch.Tensor, decode: bool, notes: list[str]) -> dict[str, Callable]:
    calls = {"bare": lambda: layer.base(x), "torch": torch_call(layer, x),
             "triton-expand": kernel_call(layer, x, fused=False), "triton-fused": kernel_call(layer, x, fused=True)}
    if decode and x.is_cuda:
        try:
            calls["triton-graph"] = graph_call(calls["triton-expand"])
        except RuntimeError as error:  # recorded, not fatal: the other variants still say something
            notes.append(f"CUDA graph capture failed for {tuple(x.shape)}: {error}")
    return calls


def measure(layer: DCFTLinear, x: torch.Tensor, decode: bool, rounds: int, repeat: int,
            notes: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """(median seconds per call by system, rel. error of each Triton variant against the torch path)."""
    with torch.inference_mode():
        calls = calls_for(layer, x, decode, notes)
        want = calls["torch"]()
        errors = {name: rel_err(calls[name](), want) for name in ("triton-expand", "triton-fused")}
        variants = [Variant(name, 0, lambda call=call: [call() for _ in range(repeat)]) for name, call in calls.items()]
        seconds = time_variants(variants, rounds, x.device)
    return {v.system: s / repeat for v, s in zip(variants, seconds, strict=True)}, errors


def run(models: dict, adapters: int, kernel: int, dtype: torch.dtype, device: torch.device, rounds: int,
        repeats: tuple[int, int], notes: list[str]) -> list[dict]:
    """One row per (layer, workload); repeats: calls per timed run for (batches, decode steps)."""
    rows = []
    for model, (shapes, workloads) in models.items():
        for role, out_f, in_f in shapes:
            layer = mixed_layer(out_f, in_f, adapters, kernel, device, dtype)
            for workload, batch, tokens in workloads:
                layer.bank.batch.slot_index = 1 + torch.arange(batch, device=device) % adapters
                x = torch.randn(batch, tokens, in_f, device=device, dtype=dtype)
                t, err = measure(layer, x, tokens == 1, rounds, repeats[tokens == 1], notes)
                rows.append({
                    "model": model, "layer": role, "shape": f"{out_f}x{in_f}", "workload": workload,
                    "tokens": batch * tokens, "dtype": str(dtype).removeprefix("torch."), "bare_ms": t["bare"] * 1e3,
                    **{f"{s}_x": t["bare"] / t[s] if s in t else None for s in SYSTEMS[1:]},
                    **{f"{key}_err": f"{err[f'triton-{key}']:.1e}" for key in ("expand", "fused")},
                })
                bad = [name for name, e in err.items() if e > TOLERANCE[dtype]]
                notes += [f"MISMATCH: {name} vs torch on {model} {role} {workload}: {err[name]:.1e}" for name in bad]
                print_row(rows[-1])
    return rows


def print_row(r: dict) -> None:
    ratios = "  ".join(f"{s} {r[f'{s}_x']:.2f}x" for s in SYSTEMS[1:] if r[f"{s}_x"] is not None)
    print(f"{r['model']:8} {r['layer']:8} {r['shape']:>10} {r['workload']:8} {r['tokens']:6} tok  "
          f"bare {r['bare_ms']:8.3f} ms  {ratios}  err {r['expand_err']}/{r['fused_err']}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--adapters", type=int, default=64, help="distinct adapters in every batch")
    parser.add_argument("--kernel", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny sizes")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    args = parser.parse_args(argv)
    args.command = " ".join(["python -m benchmarks.kernels", *(sys.argv[1:] if argv is None else argv)])
    return args


def smoke_in_interpreter(argv: list[str] | None) -> bool:
    """Re-run this benchmark in a fresh process under TRITON_INTERPRET=1, unless this is that process.

    Triton reads the variable when it defines its (and our) kernels, and other imports of the
    benchmarks load Triton early, so it must be set before the process starts. Returns True when
    the smoke run was handed to a subprocess (which has then succeeded).
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    command = [sys.executable, "-m", "benchmarks.kernels", *(sys.argv[1:] if argv is None else argv)]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env)
    if done.returncode:
        raise SystemExit(f"the interpreted smoke run failed with exit code {done.returncode}")
    return True


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke and smoke_in_interpreter(argv):
        return
    if not kernels.available():
        raise SystemExit("triton is not installed: pip install triton")
    if args.smoke:
        device, models, dtype, args.adapters, args.rounds = torch.device("cpu"), SMOKE_MODELS, torch.float32, 3, 1
    elif not torch.cuda.is_available():
        raise SystemExit("the kernel benchmark times CUDA; on a CPU machine run it with --smoke")
    else:
        device, models, dtype = torch.device("cuda"), {m: MODELS[m] for m in args.models}, getattr(torch, args.dtype)
    notes: list[str] = []
    repeats = (1, 1) if args.smoke else (5, 50)
    rows = run(models, args.adapters, args.kernel, dtype, device, args.rounds, repeats, notes)
    text = [f"One target layer, kernel {args.kernel}, rank 1, {args.adapters} distinct adapters per batch, "
            f"{dtype}; random weights (all models). `*_x` = bare time / this time; `*_err` = relative error of the "
            f"Triton output against the torch path. Median of {args.rounds} interleaved rounds.",
            "", f"Regenerate: `{args.command}`."]
    if args.smoke:
        text.append("Smoke run under Triton's interpreter on the CPU: the times mean nothing.")
    text += [f"- {note}" for note in notes]
    name = "kernels_smoke" if args.smoke else f"kernels_cuda_{str(dtype).removeprefix('torch.')}"
    path = write_report(name, "Mixed DCFT layer: torch path vs Triton kernels", rows, COLUMNS, "\n".join(text),
                        args.out)
    print(f"report: {path}")


if __name__ == "__main__":
    main()
