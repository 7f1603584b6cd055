"""The Triton kernels (adapters/kernels) agree with the pure-torch reference (adapters/functional.py).

CI has no GPU, so every case runs under Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors,
all in one subprocess: Triton reads the variable when the kernels are defined, and it must not
reach the rest of the suite (on a CUDA host it would send every mixed layer to the interpreter).
On a CUDA host the same cases also run compiled, in this process.

Tolerances (torch.testing.assert_close): fp32 rtol = atol = 1e-5 (the kernels sum in another order
than BLAS); bf16 rtol = atol = 2e-2 and fp16 rtol = atol = 5e-3 against an fp32 reference on the same
rounded inputs (bf16 keeps 8 bits, fp16 11: ~4e-3 and ~5e-4 per rounding; outputs are O(1)).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from adapters import functional as dcft
from adapters import kernels
from adapters.kernels import ops
from adapters.layer import DCFTLinear, LayerBank, SlotBatch

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
# Triton 3.6's interpreter fails on some of these cases ("only 0-dimensional arrays can be converted to
# Python scalars"), a limit of the interpreter; on a GPU the compiled test runs the same cases.
not_on_cuda = pytest.mark.skipif(
    torch.cuda.is_available(), reason="CUDA host: test_kernels_match_torch_compiled_on_cuda covers these cases there"
)
TOLERANCE = {"float32": {"rtol": 1e-5, "atol": 1e-5}, "bfloat16": {"rtol": 2e-2, "atol": 2e-2},
             "float16": {"rtol": 5e-3, "atol": 5e-3}}
BANK_SLOTS = 5  # slot 0 is the all-zero bare slot


@dataclass(frozen=True)
class Case:
    out_f: int
    in_f: int
    s: int  # kernel size (= stride)
    k: int  # rank
    slots: tuple[int, ...]  # one per row of row_len tokens
    row_len: int  # tokens per row; 1 = one slot per token (segments)
    dtype: str = "float32"
    fused: bool = False  # Triton GEMM with the DCFT epilogue, else cuBLAS/torch GEMM + expand-add
    bias: bool = True

    def __str__(self) -> str:
        rows = f"rows{len(self.slots)}x{self.row_len}" if self.row_len > 1 else f"tokens{len(self.slots)}"
        slots = "".join(map(str, self.slots)) if len(self.slots) <= 12 else f"{len(set(self.slots))}of{len(self.slots)}"
        mode = "fused" if self.fused else "expand"
        return f"{self.out_f}x{self.in_f}-s{self.s}-k{self.k}-{rows}-slots{slots}-{self.dtype}-{mode}" + (
            "" if self.bias else "-nobias")


CASES = [
    Case(32, 48, 4, 1, (2, 0, 3), 5),  # rows, bare row in the middle, odd token count
    Case(32, 48, 4, 1, (2, 0, 3), 5, fused=True),
    Case(24, 32, 8, 2, (1, 1, 1, 1), 3),  # all rows one adapter
    Case(24, 32, 8, 2, (1, 2, 3, 4), 3, fused=True),  # all distinct
    Case(40, 24, 2, 2, (0, 4, 1, 0, 2, 3, 3), 1),  # per-token slots (segments), bare tokens
    Case(40, 24, 2, 1, (0, 4, 1, 0, 2, 3, 3), 1, fused=True, bias=False),
    Case(16, 64, 8, 1, (3, 3, 0, 0, 1, 2, 2, 4, 4, 4, 1), 1),  # segments of uneven length
    Case(36, 24, 3, 2, (4, 0), 4, fused=True),  # a kernel that is not a power of two
    Case(32, 32, 4, 1, (2, 0, 3), 5, dtype="bfloat16"),
    Case(32, 32, 4, 2, (1, 0, 3, 2, 2), 1, dtype="bfloat16", fused=True),
    Case(32, 32, 4, 1, (3, 0, 1), 3, dtype="float16", fused=True),
    Case(48, 32, 8, 1, (0, 0), 2),  # only bare rows: exactly the frozen layer
    # several blocks of tokens, input blocks and outputs in every kernel (the interpreter's blocks are 16-32)
    Case(96, 160, 4, 1, (1, 0, 2, 3, 4, 4, 1), 5),
    Case(96, 160, 4, 2, (1, 0, 2, 3, 4, 4, 1), 5, fused=True),
    Case(64, 256, 8, 2, tuple(i * 7 % BANK_SLOTS for i in range(37)), 1, dtype="bfloat16", fused=True),
    Case(32, 160, 4, 1, (1, 2, 0, 3, 4), 1),  # decode-like: few tokens, the input split across programs
]


def random_cases(count: int, seed: int = 12) -> list[Case]:
    """Random shapes, slot patterns and token counts (seeded, so the ids are stable)."""
    import random

    rng, cases = random.Random(seed), []
    for i in range(count):
        s, row_len = rng.choice((2, 4, 8)), rng.choice((1, 1, 3, 7))
        rows = rng.randint(1, 24 // row_len + 1)
        cases.append(Case(s * rng.randint(1, 12), s * rng.randint(1, 12), s, rng.choice((1, 2)),
                          tuple(rng.randrange(BANK_SLOTS) for _ in range(rows)), row_len,
                          rng.choice(("float32", "bfloat16")), fused=i % 2 == 1, bias=rng.random() < 0.8))
    return cases


CASES += random_cases(6)


def make_inputs(case: Case, device: str) -> dict[str, torch.Tensor]:
    """Banks with O(1) outputs, slot 0 all zero, and x; everything rounded to the case's dtype."""
    gen = torch.Generator().manual_seed(case.out_f * 1000 + case.in_f + case.s)
    m, n = dcft.grid_shape(case.out_f, case.in_f, case.s, case.s)
    tokens = len(case.slots) * case.row_len

    def rand(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    t = {
        "x": rand(tokens, case.in_f), "weight": rand(case.out_f, case.in_f, std=case.in_f**-0.5),
        "bias": rand(case.out_f) if case.bias else None,
        "A": rand(BANK_SLOTS, case.k, n, std=n**-0.5), "B": rand(BANK_SLOTS, m, case.k),
        "C": rand(BANK_SLOTS, case.s, case.s, std=1 / case.s), "scale": torch.rand(BANK_SLOTS, generator=gen) + 0.5,
    }
    for name in ("A", "B", "C", "scale"):
        t[name][0] = 0
    dtype = getattr(torch, case.dtype)
    out = {name: None if v is None else v.to(device=device, dtype=dtype) for name, v in t.items()}
    out["slots"] = torch.tensor(case.slots, device=device)
    return out


def reference(case: Case, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(u, out) by functional.py in fp32: rows of row_len tokens, one slot per row."""
    f32 = {name: v if v is None or v.dtype == torch.long else v.float() for name, v in t.items()}
    x = f32["x"].view(len(case.slots), case.row_len, case.in_f)
    A, B, C = dcft.gather_rows(f32["A"], f32["B"], f32["C"], f32["scale"], t["slots"])
    u = dcft.mixed_input(x, A, C).reshape(-1, case.k * case.s)
    delta = dcft.mixed_delta(x, f32["A"], f32["B"], f32["C"], f32["scale"], t["slots"], f32["bias"])
    out = dcft.linear_with_delta(x, f32["weight"].t(), delta).reshape(-1, case.out_f)
    return u, out


def run_case(case: Case, device: str) -> None:
    """Shrink alone and the whole mixed linear against the reference; raises AssertionError on a mismatch."""
    from adapters.kernels import triton_dcft

    t = make_inputs(case, device)
    u_ref, out_ref = reference(case, t)
    u = triton_dcft.shrink(t["x"], t["slots"], case.row_len, t["A"], t["C"], t["scale"])
    torch.testing.assert_close(u.cpu(), u_ref.cpu(), **TOLERANCE[case.dtype])
    out = kernels.mixed_linear(t["x"], t["weight"].t(), t["bias"], t["A"], t["B"], t["C"], t["scale"], t["slots"],
                               case.row_len, fused=case.fused)
    assert out.dtype == t["x"].dtype and out.shape == out_ref.shape
    torch.testing.assert_close(out.float().cpu(), out_ref.cpu(), **TOLERANCE[case.dtype])


def run_layer(device: str) -> None:
    """A mixed DCFTLinear: the op's Triton implementation on its own bank gives the reference's output."""
    torch.manual_seed(0)
    layer = DCFTLinear(torch.nn.Linear(32, 24)).to(device)
    layer.bank = LayerBank.empty(4, (6, 8), kernel_size=4, rank=1, batch=SlotBatch(), device=device)
    for slot in (1, 2, 3):
        layer.bank.write_slot(slot, torch.randn(1, 8), torch.randn(6, 1), torch.randn(4, 4) / 4, 0.5 * slot)
    layer.bank.batch.slot_index = torch.tensor([3, 0, 1], device=device)
    x = torch.randn(3, 5, 32, device=device)
    bank = layer.bank
    args = (x, layer.base.weight, layer.base.bias, bank.A, bank.B, bank.C, bank.scale, bank.batch.slot_index)
    with torch.no_grad():
        expected = ops.reference(*args)
        for fused in (False, True):
            got = kernels.mixed_linear(x.reshape(-1, 32), layer.base_weight_t, layer.base.bias, bank.A, bank.B,
                                       bank.C, bank.scale, bank.batch.slot_index, 5, fused=fused)
            torch.testing.assert_close(got.view_as(expected), expected, **TOLERANCE["float32"])
        torch.testing.assert_close(ops.triton_mixed_linear(*args), expected, **TOLERANCE["float32"])
        # the layer's own call reaches the op (its C++ kernel on the CPU, Triton on CUDA)
        torch.testing.assert_close(layer(x), expected, **TOLERANCE["float32"])


def run_all(device: str) -> dict[str, str]:
    """Every case and the layer check: name -> "ok" or the failure's message."""
    results = {}
    checks = [(str(case), lambda case=case: run_case(case, device)) for case in CASES]
    for name, check in [*checks, ("layer", lambda: run_layer(device))]:
        try:
            check()
            results[name] = "ok"
        except Exception as error:  # noqa: BLE001 - reported per case to the parent test
            results[name] = f"{type(error).__name__}: {error}"
    return results


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    """Run every case once under TRITON_INTERPRET=1 in a subprocess; its results by case name."""
    root = Path(__file__).resolve().parents[2]
    code = f"import json, {__name__} as t; print('RESULTS ' + json.dumps(t.run_all('cpu')))"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=240)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULTS "))


@needs_triton
@not_on_cuda
@pytest.mark.parametrize("case", CASES, ids=str)
def test_kernels_match_torch_under_the_interpreter(case, interpreted):
    assert interpreted[str(case)] == "ok", interpreted[str(case)]


@needs_triton
@not_on_cuda
def test_layer_bank_through_the_kernels_matches_the_torch_path(interpreted):
    assert interpreted["layer"] == "ok", interpreted["layer"]


@pytest.mark.skipif(not (HAS_TRITON and torch.cuda.is_available()), reason="needs CUDA and triton")
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="compiled kernels, not the interpreter")
def test_kernels_match_torch_compiled_on_cuda(monkeypatch):
    """The same cases compiled for the GPU, in this process: fixed blocks (one compile per kind of
    shape), then one case autotuned, where tuning runs the in-place expand once per config."""
    from adapters.kernels import triton_dcft

    monkeypatch.setattr(triton_dcft, "AUTOTUNE", False)
    failed = {name: result for name, result in run_all("cuda").items() if result != "ok"}
    assert not failed, failed
    monkeypatch.setattr(triton_dcft, "AUTOTUNE", True)
    run_case(CASES[0], "cuda")


def test_cpu_mixed_layer_never_reaches_the_triton_kernels(monkeypatch):
    """On CPU tensors the op runs its CPU kernel, whatever the mode."""

    def fail(*args, **kwargs):
        raise AssertionError("Triton kernels called for CPU tensors")

    monkeypatch.setattr(kernels, "mixed_linear", fail)
    layer = DCFTLinear(torch.nn.Linear(16, 8))
    layer.bank = LayerBank.empty(2, (4, 8), kernel_size=2, rank=1, batch=SlotBatch())
    layer.bank.write_slot(1, torch.ones(1, 8), torch.ones(4, 1), torch.eye(2), 1.0)
    layer.bank.batch.slot_index = torch.tensor([1, 0])
    x = torch.randn(2, 3, 16)
    for mode in kernels.MODES:
        with kernels.using(mode), torch.no_grad():
            assert layer(x).shape == (2, 3, 8)


def test_unknown_kernel_mode_is_refused():
    with pytest.raises(ValueError, match="unknown kernel mode"):
        kernels.set_mode("cutlass")
