"""Fused kernels for the mixed-adapter DCFT layer, behind one registered op (`ops.py`).

A mixed layer calls `torch.ops.dcft.mixed_linear` (`ops.py`): on the CPU its C++ kernel, on CUDA
`mixed_linear` below, which runs the Triton kernels of `triton_dcft.py` (their shapes and math are
in its docstring). `adapters/functional.py` stays the reference; without a gradient only, since
the kernels have no backward (a mixed layer asked for one runs the reference).

Modes (`set_mode`, or the DCFT_KERNELS environment variable read at import):
    expand  (default) the frozen GEMM by cuBLAS with its bias epilogue, then one expand-add
            kernel that reads the output and u once and writes the output once, in place;
    fused   a Triton GEMM whose epilogue adds bias and B (x) u: one write of the output;
    torch   never: the pure-torch path everywhere.
Both kernel modes run the shrink kernel first (u = scale * C @ (A @ X) per token, one pass over x).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

MODES = ("expand", "fused", "torch")
_mode = os.environ.get("DCFT_KERNELS", "expand")


def set_mode(mode: str) -> str:
    """Choose how CUDA mixed layers run (see MODES); returns the previous mode."""
    global _mode
    if mode not in MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; one of {', '.join(MODES)}")
    previous, _mode = _mode, mode
    return previous


def mode() -> str:
    return _mode


@contextlib.contextmanager
def using(mode: str) -> Iterator[None]:
    """`set_mode(mode)` inside the block, the previous mode restored after."""
    previous = set_mode(mode)
    try:
        yield
    finally:
        set_mode(previous)


@functools.cache
def available() -> bool:
    """True when Triton and these kernels import (a CPU-only machine without Triton says False)."""
    try:
        from adapters.kernels import triton_dcft  # noqa: F401
    except ImportError:
        return False
    return True


def mixed_linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, A_bank: torch.Tensor,
                 B_bank: torch.Tensor, C_bank: torch.Tensor, scale_bank: torch.Tensor, slots: torch.Tensor,
                 row_len: int, fused: bool | None = None) -> torch.Tensor:
    """x @ weight_t + bias + each token's DCFT update, its slot's tensors read from the banks.

    x: (N, in)   weight_t: (in, out), any strides   bias: (out,) or None
    A_bank: (S, k, n)   B_bank: (S, m, k)   C_bank: (S, s, s)   scale_bank: (S,)   (stride == kernel)
    slots: (N / row_len,) int: token t uses slot slots[t // row_len] (row_len 1: one slot per token).
    Returns (N, out) in x's dtype. fused: None follows `mode()`.
    """
    from adapters.kernels import triton_dcft as tk

    x = x if x.stride(-1) == 1 else x.contiguous()
    slots = slots.to(x.device)  # a no-op when the engine put the index on the model's device
    u = tk.shrink(x, slots, row_len, A_bank, C_bank, scale_bank)  # (N, k*s) fp32
    if _mode == "fused" if fused is None else fused:
        return tk.linear_dcft(x, weight_t, bias, u, slots, row_len, B_bank)
    base = torch.nn.functional.linear(x, weight_t.t(), bias)  # cuBLAS, bias in its epilogue
    return tk.expand_add(base, u, slots, row_len, B_bank, out=base)
