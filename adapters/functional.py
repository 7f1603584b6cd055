"""DCFT math as pure tensor functions: tensors in, tensors out (DESIGN.md §1).

Shapes, PyTorch layout, per target layer with weight W: (out, in):
    A: (k, n)    B: (m, k)    C: (s, s)    n = (in - s)/stride + 1, m = (out - s)/stride + 1
    dW = scale * conv_transpose2d(B @ A, C, stride)          # (out, in)
       = scale * kron(B @ A, C)                              # when stride == s

The factored form never builds dW. It splits dW^T = G @ H into two thin maps:
    G = input_map(A, C):  (in, k*s)    x @ G gathers each input block through A and C
    H = output_map(B):    (k*s, out)   spreads the k*s values back out through B
so the update costs two skinny GEMMs, O((in + out) * k * s) per token, and runs as
dense matrix work on any device instead of many tiny reshaped products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grid_shape(out_features: int, in_features: int, kernel_size: int, stride: int) -> tuple[int, int]:
    """(m, n): the shape of F = B @ A for a layer, or ValueError if the kernel does not tile it."""
    if stride > kernel_size:
        raise ValueError(f"stride {stride} is larger than kernel {kernel_size}")
    for name, size in (("in_features", in_features), ("out_features", out_features)):
        if size < kernel_size or (size - kernel_size) % stride:
            what = "divide" if stride == kernel_size else f"tile with stride {stride}"
            raise ValueError(f"kernel {kernel_size} does not {what} {name} {size}")
    return (out_features - kernel_size) // stride + 1, (in_features - kernel_size) // stride + 1


def delta_weight(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, stride: int, scale: float = 1.0) -> torch.Tensor:
    """dW (out, in) by the paper's transposed convolution; any stride <= kernel."""
    grid = (B @ A)[None, None]  # (1, 1, m, n)
    return scale * F.conv_transpose2d(grid, C[None, None], stride=stride)[0, 0]


def delta_weight_kron(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """dW (out, in) = scale * kron(B @ A, C); only valid for stride == kernel."""
    return scale * torch.kron(B @ A, C)


def input_map(A: torch.Tensor, C: torch.Tensor, stride: int) -> torch.Tensor:
    """G: (..., in, k*s) with x @ G = the k*s numbers each token feeds into B.

    stride == s: G = kron(A^T, C^T), batched over leading dims (one per bank row).
    stride <  s: G[:, j*s + a] = conv_transpose1d(A[j], C[a]) (overlapping blocks).
    """
    s = C.shape[-1]
    if stride == s:
        # G[..., q*s + b, j*s + a] = A[..., j, q] * C[..., a, b]
        blocks = A.mT[..., :, None, :, None] * C.mT[..., None, :, None, :]
        return blocks.flatten(-4, -3).flatten(-2, -1)
    if A.dim() != 2:
        raise ValueError("batched input_map needs stride == kernel")
    rows = F.conv_transpose1d(A[:, None, :], C[None], stride=stride)  # (k, s, in)
    return rows.permute(2, 0, 1).flatten(1)


def output_map(B: torch.Tensor, kernel_size: int, stride: int) -> torch.Tensor:
    """H: (..., k*s, out) that overlap-adds the k*s values through B into the output."""
    eye = torch.eye(kernel_size, dtype=B.dtype, device=B.device)
    if stride == kernel_size:
        # H[..., j*s + a, p*s + c] = B[..., p, j] * I[a, c]
        blocks = B.mT[..., :, None, :, None] * eye[:, None, :]
        return blocks.flatten(-4, -3).flatten(-2, -1)
    if B.dim() != 2:
        raise ValueError("batched output_map needs stride == kernel")
    rows = F.conv_transpose1d(B.mT[:, None, :], eye[None], stride=stride)  # (k, s, out)
    return rows.flatten(0, 1)


def factored_delta(
    x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, stride: int, scale: float = 1.0
) -> torch.Tensor:
    """x @ dW^T for one adapter, x: (..., in) -> (..., out), without forming dW."""
    G = input_map(A, C, stride) * scale
    return (x @ G) @ output_map(B, C.shape[-1], stride)


def mixed_delta(
    x: torch.Tensor,
    A_bank: torch.Tensor,
    B_bank: torch.Tensor,
    C_bank: torch.Tensor,
    scale_bank: torch.Tensor,
    slot_index: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row adapters: row r of x uses bank slot slot_index[r] (stride == kernel).

    x: (R, T, in)   A_bank: (S, k, n)   B_bank: (S, m, k)   C_bank: (S, s, s)
    scale_bank: (S,)   slot_index: (R,) long   bias: (out,) folded in for free.
    Returns (R, T, out). A slot whose tensors are zero (the bank's "none" slot)
    adds exactly nothing, so bare-backbone rows ride in the same batch.
    """
    s = C_bank.shape[-1]
    G = input_map(A_bank[slot_index], C_bank[slot_index], s)  # (R, in, k*s)
    G = G * scale_bank[slot_index, None, None]
    H = output_map(B_bank[slot_index], s, s)  # (R, k*s, out)
    U = torch.bmm(x, G)  # (R, T, k*s)
    if bias is None:
        return torch.bmm(U, H)
    return torch.baddbmm(bias.expand(x.shape[0], x.shape[1], -1), U, H)


def linear_with_delta(x: torch.Tensor, weight_t: torch.Tensor, bias_and_delta: torch.Tensor) -> torch.Tensor:
    """x @ weight_t + bias_and_delta, with the GEMM accumulating straight into the delta.

    weight_t: (in, out). bias_and_delta: (..., out), a fresh tensor that is consumed.
    Accumulating in place costs no extra pass over the output, which is what keeps
    a mixed-adapter layer at the speed of the bare layer (without grad).
    """
    flat_x = x.reshape(-1, x.shape[-1])
    flat_d = bias_and_delta.reshape(-1, weight_t.shape[1])
    if torch.is_grad_enabled() and (x.requires_grad or bias_and_delta.requires_grad):
        return torch.addmm(flat_d, flat_x, weight_t).view(bias_and_delta.shape)
    return flat_d.addmm_(flat_x, weight_t).view(bias_and_delta.shape)


def orthogonal_penalty(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Paper eq. 4 for one layer: ||A A^T - I_k||_F + ||B^T B - I_k||_F."""
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return torch.linalg.matrix_norm(A @ A.mT - eye) + torch.linalg.matrix_norm(B.mT @ B - eye)
