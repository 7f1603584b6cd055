"""Triton kernels for the mixed-adapter DCFT layer (stride == kernel): shrink, expand-add, and a
GEMM with a DCFT epilogue. Pure tensors in and out; `adapters/functional.py` is the reference.

Shapes (N tokens, S bank slots, k rank, s kernel, n = in/s, m = out/s):
    x: (N, in)    A_bank: (S, k, n)    B_bank: (S, m, k)    C_bank: (S, s, s)    scale_bank: (S,)
    slots: (N / row_len,) int: token t uses bank slot slots[t // row_len]
           (row_len = T for one slot per row of T tokens, 1 for one slot per token: segments)
    u: (N, k*s) fp32, u[t, j*s + a] = scale * sum_b C[a, b] * (A @ X_t)[j, b],  X_t = x_t viewed (n, s)
    out[t, p*s + a] = base[t, p*s + a] + sum_j B[p, j] * u[t, j*s + a]

Each kernel gathers its tokens' slot tensors by index (no per-row copies of A, B, C) and
accumulates in fp32 whatever the storage dtype (fp32, bf16, fp16). With few tokens (decode) the
shrink also splits the input across programs and adds their partial u atomically, so its last
bits may vary between runs. Only stride == kernel is handled: the one layout a LayerBank holds.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# DCFT_TRITON_AUTOTUNE=0: fixed GPU blocks instead of autotuning (fast compiles, for tests)
AUTOTUNE = os.environ.get("DCFT_TRITON_AUTOTUNE", "1") != "0"


_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"  # read by Triton, too, as the kernels are defined


def interpreting() -> bool:
    """True when Triton runs these kernels in its CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRETED


def _launch(kernel, tuned, grid, args: tuple, kwargs: dict, interpreted: triton.Config, fixed: triton.Config) -> None:
    """Run a kernel: small blocks under the interpreter, `fixed` without autotuning, else autotuned.

    grid: meta-parameters (the config's kwargs) -> the launch grid.
    """
    if AUTOTUNE and not interpreting():
        tuned[grid](*args, **kwargs)
        return
    config = interpreted if interpreting() else fixed
    kernel[grid(config.kwargs)](*args, **kwargs, **config.kwargs, num_warps=config.num_warps,
                                num_stages=config.num_stages)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


# --- shrink: u = scale * C @ (A @ X) per token ---------------------------------------------------


@triton.jit
def _shrink_kernel(x_ptr, slots_ptr, a_ptr, c_ptr, scale_ptr, u_ptr, n_tokens, row_len, x_stride, n_blocks,
                   TOKENS_BUCKET, K: tl.constexpr, S: tl.constexpr, S_PAD: tl.constexpr, KS_PAD: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_Q: tl.constexpr, SPLIT_Q: tl.constexpr):
    """Program (i, p): tokens block i, input blocks q = p*BQ.. stepping SPLIT_Q*BQ (split-K for few tokens)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BT,) tokens
    t_ok = t < n_tokens
    slot = tl.load(slots_ptr + t // row_len, mask=t_ok, other=0).to(tl.int64)
    t_ok = t_ok & (slot != 0)  # bare-slot tokens read nothing: their u stays 0
    col = tl.arange(0, KS_PAD)  # column j * S_PAD + b of the (k, s) block Z = A @ X
    j, b = col // S_PAD, col % S_PAD
    col_ok = (j < K) & (b < S)
    rows = t.to(tl.int64)[:, None, None] * x_stride
    z = tl.zeros((BLOCK_T, KS_PAD), dtype=tl.float32)
    for q0 in range(tl.program_id(1) * BLOCK_Q, n_blocks, BLOCK_Q * SPLIT_Q):  # one pass over x in (BT, BQ*s) tiles
        q = q0 + tl.arange(0, BLOCK_Q)
        ok = t_ok[:, None, None] & (q < n_blocks)[None, :, None] & col_ok[None, None, :]
        xs = tl.load(x_ptr + rows + q[None, :, None] * S + b[None, None, :], mask=ok, other=0.0)
        a_off = slot[:, None, None] * (K * n_blocks) + j[None, None, :] * n_blocks + q[None, :, None]
        a = tl.load(a_ptr + a_off, mask=ok, other=0.0)
        z += tl.sum(xs.to(tl.float32) * a.to(tl.float32), axis=1)  # Z[t, j, b] = sum_q A[j, q] X[q, b]
    # u[t, j*s + a] = scale * sum_b C[a, b] Z[t, j, b]: a block-diagonal (KS_PAD, KS_PAD) map per token
    same = (j[:, None] == j[None, :]) & col_ok[:, None] & col_ok[None, :]
    c_off = slot[:, None, None] * (S * S) + b[None, :, None] * S + b[None, None, :]
    cw = tl.load(c_ptr + c_off, mask=t_ok[:, None, None] & same[None, :, :], other=0.0)
    u = tl.sum(cw.to(tl.float32) * z[:, None, :], axis=2)
    u = u * tl.load(scale_ptr + slot, mask=t_ok, other=0.0).to(tl.float32)[:, None]
    u_off = t.to(tl.int64)[:, None] * (K * S) + (j * S + b)[None, :]
    if SPLIT_Q == 1:
        tl.store(u_ptr + u_off, u, mask=t_ok[:, None] & col_ok[None, :])
    else:  # C and the scale are linear: the splits' partial u add up
        tl.atomic_add(u_ptr + u_off, u, mask=t_ok[:, None] & col_ok[None, :])


_SHRINK_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_Q": bq, "SPLIT_Q": split}, num_warps=w)
    for bt, bq, split, w in [(16, 16, 1, 4), (32, 16, 1, 4), (32, 32, 1, 4), (64, 16, 1, 4), (64, 32, 1, 8),
                             (128, 8, 1, 8), (16, 16, 4, 4), (16, 16, 16, 4), (32, 32, 8, 4), (16, 64, 8, 4)]
]
# reset_to_zero: split configs add into u, and tuning runs each config more than once
_shrink_tuned = triton.autotune(_SHRINK_CONFIGS, key=["n_blocks", "TOKENS_BUCKET", "K", "S"],
                                reset_to_zero=["u_ptr"])(_shrink_kernel)


def shrink(x: torch.Tensor, slots: torch.Tensor, row_len: int, A_bank: torch.Tensor, C_bank: torch.Tensor,
           scale_bank: torch.Tensor) -> torch.Tensor:
    """u: (N, k*s) fp32 from x: (N, in), each token's A, C, scale gathered from the banks by slot."""
    tokens, (_, k, n), s = x.shape[0], A_bank.shape, C_bank.shape[-1]
    u = torch.zeros(tokens, k * s, device=x.device, dtype=torch.float32)  # split configs add into it
    if tokens == 0:
        return u
    args = (x, slots, A_bank.contiguous(), C_bank.contiguous(), scale_bank.contiguous(), u, tokens, row_len,
            x.stride(0), n, _bucket(tokens))
    shape = {"K": k, "S": s, "S_PAD": _pow2(s), "KS_PAD": _pow2(k) * _pow2(s)}
    few = tokens <= 128  # decode: too few token blocks to fill the GPU, so split the input too
    _launch(_shrink_kernel, _shrink_tuned, lambda meta: (triton.cdiv(tokens, meta["BLOCK_T"]), meta["SPLIT_Q"]),
            args, shape, triton.Config({"BLOCK_T": 16, "BLOCK_Q": 16, "SPLIT_Q": 2 if tokens < 16 else 1}),
            _SHRINK_CONFIGS[8 if few else 1])
    return u


def _bucket(tokens: int) -> int:
    """Autotune key for the token count: powers of two, so a new batch size does not retune."""
    return min(_pow2(tokens), 1 << 16)


# --- expand: out = base + B (x) u, one read of base and u, one write -----------------------------


@triton.jit
def _spread(acc, t, o, ok, slot, u_ptr, b_ptr, m, K: tl.constexpr, S: tl.constexpr):
    """acc[t, p*s + a] += sum_j B[slot_t, p, j] * u[t, j*s + a] for the (BT, BO) tile."""
    p, a = o // S, o % S
    ok = ok & (slot != 0)[:, None]  # the bare slot adds nothing: skip its reads
    for j in tl.static_range(K):
        bw = tl.load(b_ptr + slot[:, None] * (m * K) + p[None, :] * K + j, mask=ok, other=0.0)
        uu = tl.load(u_ptr + t.to(tl.int64)[:, None] * (K * S) + j * S + a[None, :], mask=ok, other=0.0)
        acc += bw.to(tl.float32) * uu
    return acc


@triton.jit
def _expand_kernel(base_ptr, out_ptr, u_ptr, slots_ptr, b_ptr, n_tokens, row_len, out_features, m,
                   base_stride, out_stride, TOKENS_BUCKET, K: tl.constexpr, S: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    t_ok = t < n_tokens
    ok = t_ok[:, None] & (o < out_features)[None, :]
    slot = tl.load(slots_ptr + t // row_len, mask=t_ok, other=0).to(tl.int64)
    rows = t.to(tl.int64)[:, None]
    acc = tl.load(base_ptr + rows * base_stride + o[None, :], mask=ok, other=0.0).to(tl.float32)
    acc = _spread(acc, t, o, ok, slot, u_ptr, b_ptr, m, K, S)
    tl.store(out_ptr + rows * out_stride + o[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


_EXPAND_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_O": bo}, num_warps=w)
    for bt, bo, w in [(16, 128, 4), (32, 128, 4), (32, 256, 4), (64, 128, 8), (64, 256, 8), (8, 512, 4)]
]
# restore_value: the kernel may run in place (out is base), and tuning runs it once per config
_expand_tuned = triton.autotune(_EXPAND_CONFIGS, key=["out_features", "TOKENS_BUCKET", "K", "S"],
                                restore_value=["base_ptr"])(_expand_kernel)


def expand_add(base: torch.Tensor, u: torch.Tensor, slots: torch.Tensor, row_len: int, B_bank: torch.Tensor,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """out = base + B (x) u, base: (N, out) (bias already in it), u: (N, k*s); out=base works in place."""
    tokens, out_features = base.shape
    out = torch.empty_like(base) if out is None else out
    (_, m, k), s = B_bank.shape, u.shape[1] // B_bank.shape[-1]
    if tokens == 0:
        return out
    args = (base, out, u, slots, B_bank.contiguous(), tokens, row_len, out_features, m, base.stride(0),
            out.stride(0), _bucket(tokens))
    _launch(_expand_kernel, _expand_tuned,
            lambda meta: (triton.cdiv(tokens, meta["BLOCK_T"]), triton.cdiv(out_features, meta["BLOCK_O"])),
            args, {"K": k, "S": s}, triton.Config({"BLOCK_T": 16, "BLOCK_O": 32}), _EXPAND_CONFIGS[1])
    return out


# --- the frozen GEMM with a DCFT epilogue: out = x @ W^T + bias + B (x) u, one write ---------------


@triton.jit
def _linear_dcft_kernel(x_ptr, w_ptr, bias_ptr, u_ptr, slots_ptr, b_ptr, out_ptr, n_tokens, in_features,
                        out_features, row_len, m, x_stride, w_stride_in, w_stride_out, out_stride, TOKENS_BUCKET,
                        HAS_BIAS: tl.constexpr, K: tl.constexpr, S: tl.constexpr, PRECISION: tl.constexpr,
                        UPCAST: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr,
                        BLOCK_I: tl.constexpr, GROUP_T: tl.constexpr):
    pid_t, pid_o = _grouped(tl.program_id(0), n_tokens, out_features, BLOCK_T, BLOCK_O, GROUP_T)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    t_ok, o_ok = t < n_tokens, o < out_features
    rows = t.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32)
    for i0 in range(0, in_features, BLOCK_I):
        i = i0 + tl.arange(0, BLOCK_I)
        i_ok = i < in_features
        xs = tl.load(x_ptr + rows * x_stride + i[None, :], mask=t_ok[:, None] & i_ok[None, :], other=0.0)
        w_off = i.to(tl.int64)[:, None] * w_stride_in + o.to(tl.int64)[None, :] * w_stride_out
        ws = tl.load(w_ptr + w_off, mask=i_ok[:, None] & o_ok[None, :], other=0.0)
        if UPCAST:  # the interpreter's tl.dot is wrong on bf16 operands; it checks the math in fp32
            xs, ws = xs.to(tl.float32), ws.to(tl.float32)
        acc = tl.dot(xs, ws, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=o_ok, other=0.0).to(tl.float32)[None, :]
    ok = t_ok[:, None] & o_ok[None, :]
    slot = tl.load(slots_ptr + t // row_len, mask=t_ok, other=0).to(tl.int64)
    acc = _spread(acc, t, o, ok, slot, u_ptr, b_ptr, m, K, S)
    tl.store(out_ptr + rows * out_stride + o[None, :], acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _grouped(pid, n_tokens, out_features, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, GROUP_T: tl.constexpr):
    """Program id -> (token block, output block), GROUP_T token blocks at a time for L2 reuse of W."""
    blocks_t, blocks_o = tl.cdiv(n_tokens, BLOCK_T), tl.cdiv(out_features, BLOCK_O)
    group = pid // (GROUP_T * blocks_o)
    first = group * GROUP_T
    size = tl.minimum(blocks_t - first, GROUP_T)
    return first + (pid % (GROUP_T * blocks_o)) % size, (pid % (GROUP_T * blocks_o)) // size


_LINEAR_CONFIGS = [
    triton.Config({"BLOCK_T": bt, "BLOCK_O": bo, "BLOCK_I": bi, "GROUP_T": 8}, num_warps=w, num_stages=st)
    for bt, bo, bi, w, st in [
        (128, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 256, 64, 8, 3),
        (64, 64, 64, 4, 4), (32, 64, 64, 4, 4), (16, 64, 128, 4, 3), (16, 128, 64, 4, 4),
    ]
]
_linear_tuned = triton.autotune(_LINEAR_CONFIGS, key=["in_features", "out_features", "TOKENS_BUCKET", "K", "S"])(
    _linear_dcft_kernel
)


def linear_dcft(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None, u: torch.Tensor,
                slots: torch.Tensor, row_len: int, B_bank: torch.Tensor) -> torch.Tensor:
    """x @ weight_t + bias + B (x) u in one kernel: x (N, in), weight_t (in, out) any strides -> (N, out)."""
    tokens, in_features = x.shape
    out_features = weight_t.shape[1]
    out = torch.empty(tokens, out_features, device=x.device, dtype=x.dtype)
    (_, m, k), s = B_bank.shape, u.shape[1] // B_bank.shape[-1]
    if tokens == 0:
        return out
    args = (x, weight_t, out if bias is None else bias, u, slots, B_bank.contiguous(), out, tokens, in_features,
            out_features, row_len, m, x.stride(0), weight_t.stride(0), weight_t.stride(1), out.stride(0),
            _bucket(tokens))
    flags = {"HAS_BIAS": bias is not None, "K": k, "S": s, "UPCAST": interpreting(),
             "PRECISION": "ieee" if x.dtype == torch.float32 else None}
    _launch(_linear_dcft_kernel, _linear_tuned,
            lambda meta: (triton.cdiv(tokens, meta["BLOCK_T"]) * triton.cdiv(out_features, meta["BLOCK_O"]),),
            args, flags, triton.Config({"BLOCK_T": 16, "BLOCK_O": 16, "BLOCK_I": 16, "GROUP_T": 2}),
            _LINEAR_CONFIGS[2])
    return out
