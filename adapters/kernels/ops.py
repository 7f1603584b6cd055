"""`torch.ops.dcft.mixed_linear`: a mixed-adapter DCFT layer's whole forward as one registered op.

    mixed_linear(x, weight, bias, A_bank, B_bank, C_bank, scale_bank, slots, weight_transposed) -> out
    x: (..., in) -> out: (..., out) = x @ W^T + bias + each token's DCFT update, read from the banks by
    slot (slots: (R,) long, R dividing the token count; slot 0 = the bare backbone, skipped).

Why one op: in eager mode every dispatched op costs host time whatever its math (~2-3 us on a CPU,
~10-20 us of launches on a GPU), and the update built from torch ops dispatched 27 per layer. Here
the frozen GEMM, the gather by slot, the shrink and the expand are one node, so eager pays one dispatch
per wrapped layer, and `torch.compile` and CUDA-graph capture see one node with a fake implementation.
Eager layers call `mixed_linear_eager`: the same op, whose CPU kernel a direct binding reaches without
the registered op's boxed call from Python (4.7 us a call, against 0.3 for the binding), where no
dispatch mode, tensor subclass, device or gradient needs the dispatcher; anything else goes through it.

Implementations, by device:
    CPU   a fused C++ kernel (`mixed_linear_cpu.cpp`), built once per machine (about 25 s on 2 cores,
          cached by torch) with the system's C++ compiler when this module is first imported, loaded
          in 0.1 s after that; where none builds, the torch reference, with a warning;
    CUDA  the Triton kernels of `adapters/kernels` (shrink, then cuBLAS + expand-add, or one fused GEMM);
    Meta  shapes only (torch.compile's fake tensors).
`adapters/functional.py` stays the reference every implementation is tested against.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from adapters import functional as dcft
from adapters import kernels

logger = logging.getLogger(__name__)

SCHEMA = ("mixed_linear(Tensor x, Tensor weight, Tensor? bias, Tensor A_bank, Tensor B_bank, Tensor C_bank, "
          "Tensor scale_bank, Tensor slots, bool weight_transposed=False) -> Tensor")
_SOURCE = Path(__file__).with_name("mixed_linear_cpu.cpp")

_library = torch.library.Library("dcft", "DEF")
_library.define(SCHEMA)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A_bank: torch.Tensor,
              B_bank: torch.Tensor, C_bank: torch.Tensor, scale_bank: torch.Tensor, slots: torch.Tensor,
              weight_transposed: bool = False) -> torch.Tensor:
    """The op by `functional.py`'s torch math: the CPU fallback, the `torch` kernel mode, and the tests' yardstick."""
    weight_t = weight if weight_transposed else weight.t()
    rows = x.reshape(slots.shape[0], -1, x.shape[-1])  # (R, T, in): one slot per row of T tokens
    delta = dcft.mixed_delta(rows, A_bank, B_bank, C_bank, scale_bank, slots, bias)
    out = dcft.linear_with_delta(rows, weight_t, delta)
    return out.view(*x.shape[:-1], weight_t.shape[1])


def triton_mixed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, A_bank: torch.Tensor,
                        B_bank: torch.Tensor, C_bank: torch.Tensor, scale_bank: torch.Tensor, slots: torch.Tensor,
                        weight_transposed: bool = False) -> torch.Tensor:
    """The CUDA implementation: the Triton kernels (the reference in the `torch` kernel mode or without Triton)."""
    if kernels.mode() == "torch" or not kernels.available():
        return reference(x, weight, bias, A_bank, B_bank, C_bank, scale_bank, slots, weight_transposed)
    flat = x.reshape(-1, x.shape[-1])
    weight_t = weight if weight_transposed else weight.t()
    out = kernels.mixed_linear(flat, weight_t, bias, A_bank, B_bank, C_bank, scale_bank, slots,
                               flat.shape[0] // slots.shape[0])
    return out.view(*x.shape[:-1], weight_t.shape[1])


def _fake(x, weight, bias, A_bank, B_bank, C_bank, scale_bank, slots, weight_transposed=False):
    out_features = weight.shape[1] if weight_transposed else weight.shape[0]
    return x.new_empty(*x.shape[:-1], out_features)


_library.impl("mixed_linear", triton_mixed_linear, "CUDA")
torch.library.register_fake("dcft::mixed_linear", _fake, lib=_library)


def _cpu_extension():
    """Build (once per machine; cached by torch under TORCH_EXTENSIONS_DIR) and load the C++ CPU kernel:
    it registers the op's CPU implementation and binds `mixed_linear_eager`. None where no compiler builds
    it; the op's CPU implementation is then the torch reference."""
    try:
        from torch.utils import cpp_extension

        return cpp_extension.load(name="dcft_mixed_linear_cpu", sources=[str(_SOURCE)],
                                  extra_cflags=["-O3", "-Wno-psabi"], verbose=False)
    except Exception as err:  # noqa: BLE001 - no compiler or headers: slower, still exact
        logger.warning("the fused CPU DCFT kernel did not build (%s); mixed layers run the torch reference",
                       str(err).splitlines()[0] if str(err) else type(err).__name__)
        _library.impl("mixed_linear", reference, "CPU")
        return None


def cpu_kernel() -> str:
    """Which implementation the op runs on the CPU: "fused" (the C++ kernel) or "reference"."""
    return "reference" if _extension is None else "fused"


_extension = _cpu_extension()  # at import, so the op runs on the CPU whoever calls it first (0.1 s once built)
mixed_linear = torch.ops.dcft.mixed_linear.default
# What an eager layer calls: the same op, the CPU kernel reached without the dispatcher's boxed call
# where nothing else must see it (mixed_linear_cpu.cpp says when); torch.compile traces `mixed_linear`.
mixed_linear_eager = mixed_linear if _extension is None else _extension.mixed_linear
