"""DCFT math as pure tensor functions: tensors in, tensors out (docs/architecture.md, "The math contract").

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


def lora_factors(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same update as an exact LoRA of rank k*s: dW = scale * up @ down, any stride <= kernel.

    down = G^T: (k*s, in)    up = H^T: (out, k*s)    (PEFT's lora_A and lora_B weights)
    """
    s = C.shape[-1]
    return input_map(A, C, stride).mT.contiguous(), output_map(B, s, stride).mT.contiguous()


def factored_delta(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    stride: int,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x @ dW^T (+ bias) for one adapter, x: (..., in) -> (..., out), without forming dW."""
    s = C.shape[-1]
    U = x @ (input_map(A, C, stride) * scale)  # (..., k*s)
    training = torch.is_grad_enabled() and (U.requires_grad or B.requires_grad)
    if stride == s and not training:
        return spread_output(U, B, bias)
    # Training goes through H: its backward is two GEMMs, where spread_output's broadcast
    # needs multiply-and-sum passes over the whole output (measured ~1.2-2.5x slower per layer).
    H = output_map(B, s, stride)  # (k*s, out)
    if bias is None:
        return U @ H
    return torch.addmm(bias, U.reshape(-1, U.shape[-1]), H).view(*U.shape[:-1], H.shape[-1])


def spread_output(U: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """bias + U @ H for stride == kernel, one pass over the output, no H built.

    U: (R, ..., k*s)   B: (m, k), or (R, m, k) with one adapter per leading row.
    out[..., p*s + a] = bias[p*s + a] + sum_j B[p, j] * U[..., j*s + a]
    """
    m, k = B.shape[-2:]
    s = U.shape[-1] // k
    lead = U.shape[:-1]
    per_row = B.dim() == 3  # B: (R, m, k) -> broadcast over the middle dims of U
    B_view = B.reshape(B.shape[0], *[1] * (len(lead) - 1), m, k) if per_row else B
    B_blocks = B_view[..., :, :, None]  # (..., m, k, 1)
    U_blocks = U.reshape(*lead, 1, k, s)  # (..., 1, k, s)
    if k == 1:  # the common case: one fused multiply-add writes the output once
        factors = B_blocks[..., 0, :], U_blocks[..., 0, :]  # (..., m, 1) and (..., 1, s)
        spread = factors[0] * factors[1] if bias is None else torch.addcmul(bias.view(m, s), *factors)
    else:
        spread = (B_blocks * U_blocks).sum(-2)
        spread = spread if bias is None else spread + bias.view(m, s)
    return spread.reshape(*lead, m * s)


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
    return rows_delta(x, *gather_rows(A_bank, B_bank, C_bank, scale_bank, slot_index), bias)


def gather_rows(A_bank: torch.Tensor, B_bank: torch.Tensor, C_bank: torch.Tensor, scale_bank: torch.Tensor,
                slot_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's (A, B, scale * C) from the stacked banks: (R, k, n), (R, m, k), (R, s, s)."""
    return A_bank[slot_index], B_bank[slot_index], C_bank[slot_index] * scale_bank[slot_index, None, None]


def rows_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """`mixed_delta` on tensors already gathered per row (C with its scale folded in)."""
    return spread_output(mixed_input(x, A, C), B, bias)  # (R, T, out)


def mixed_input(x: torch.Tensor, A: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """U = x @ G per row, G = kron(A^T, C^T), without a loop over rows (stride == kernel).

    x: (R, T, in)   A: (R, k, n)   C: (R, s, s), scale folded in.   Returns U: (R, T, k*s), contiguous:
    spread_output's broadcast takes its output layout from U, and a transposed U would give a
    transposed output that costs a full copy to reshape.
    """
    rows, tokens, _ = x.shape
    n, s = A.shape[-1], C.shape[-1]
    if tokens < s:
        # Few tokens per row (decoding): G holds k*s values per input feature, more than x
        # itself, so apply A then C to the (n, s) blocks instead (measured ~3-5x faster at T = 1).
        Z = torch.matmul(A[:, None], x.reshape(rows, tokens, n, s))  # (R, T, k, s)
        return torch.matmul(Z, C.mT[:, None]).flatten(2)
    # G^T = kron(A, C) per row, built directly in (R, k*s, in) layout: BLAS runs the
    # small-output product G^T @ x^T faster than x @ G (measured ~1.5x at MiniLM shapes).
    G_t = (A[:, :, None, :, None] * C[:, None, :, None, :]).flatten(1, 2).flatten(2, 3)  # (R, k*s, in)
    return torch.bmm(G_t, x.transpose(1, 2)).transpose(1, 2).contiguous()


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
