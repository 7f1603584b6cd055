"""The DCFT math: every way of computing the update agrees (docs/architecture.md, "The math contract")."""

import pytest
import torch

from adapters import functional as dcft

# (out, in, kernel, stride, rank): MiniLM and SmolLM2 shapes, strides < kernel, rank > 1
SHAPES = [
    (384, 384, 8, 8, 1),
    (1536, 384, 12, 12, 1),
    (192, 576, 4, 4, 2),
    (40, 24, 8, 4, 1),
    (24, 40, 8, 2, 3),
    (30, 30, 3, 3, 1),
]


def random_adapter(out_f, in_f, s, stride, k, dtype=torch.float64, generator=None):
    m, n = dcft.grid_shape(out_f, in_f, s, stride)
    return (torch.randn(k, n, dtype=dtype, generator=generator),
            torch.randn(m, k, dtype=dtype, generator=generator),
            torch.randn(s, s, dtype=dtype, generator=generator))


def kron_delta(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """dW = scale * kron(B @ A, C): the closed form of the transposed convolution at stride = kernel."""
    return scale * torch.kron(B @ A, C)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("out_f,in_f,s,stride,k", SHAPES)
def test_factored_matches_dense_delta(out_f, in_f, s, stride, k):
    A, B, C = random_adapter(out_f, in_f, s, stride, k)
    dW = dcft.delta_weight(A, B, C, stride, scale=0.5)
    assert dW.shape == (out_f, in_f)
    x = torch.randn(3, 5, in_f, dtype=torch.float64)
    assert rel_err(dcft.factored_delta(x, A, B, C, stride, 0.5), x @ dW.T) < 1e-12
    # dW^T = G @ H is the identity the factored path rests on
    G, H = dcft.input_map(A, C, stride), dcft.output_map(B, s, stride)
    assert rel_err(0.5 * G @ H, dW.T) < 1e-12
    if stride == s:
        assert rel_err(kron_delta(A, B, C, 0.5), dW) < 1e-12


@pytest.mark.parametrize("out_f,in_f,s,stride,k", [sh for sh in SHAPES if sh[2] == sh[3]])
def test_fp32_paths_agree(out_f, in_f, s, stride, k):
    A, B, C = random_adapter(out_f, in_f, s, stride, k, torch.float32)
    x = torch.randn(4, 7, in_f)
    reference = x.double() @ dcft.delta_weight(A.double(), B.double(), C.double(), stride).T
    assert rel_err(dcft.factored_delta(x, A, B, C, stride).double(), reference) < 1e-5
    assert rel_err((x @ kron_delta(A, B, C).T).double(), reference) < 1e-5


def test_mixed_rows_match_each_adapter_alone():
    out_f, in_f, s = 96, 64, 8
    adapters = [random_adapter(out_f, in_f, s, s, 1, torch.float32) for _ in range(3)]
    zero = tuple(torch.zeros_like(t) for t in adapters[0])  # slot 0: no adapter
    A_bank, B_bank, C_bank = (torch.stack(parts) for parts in zip(zero, *adapters, strict=True))
    scales = torch.tensor([0.0, 1.0, 0.5, 2.0])
    slots = torch.tensor([1, 0, 3, 2, 1, 0])
    x = torch.randn(len(slots), 5, in_f)
    bias = torch.randn(out_f)
    mixed = dcft.mixed_delta(x, A_bank, B_bank, C_bank, scales, slots, bias)
    for row, slot in enumerate(slots.tolist()):
        if slot == 0:
            torch.testing.assert_close(mixed[row], bias.expand(5, -1))
            continue
        A, B, C = adapters[slot - 1]
        alone = dcft.factored_delta(x[row], A, B, C, s, scales[slot].item()) + bias
        assert rel_err(mixed[row], alone) < 1e-5


def test_linear_with_delta_with_and_without_grad():
    x, W, D = torch.randn(2, 3, 16), torch.randn(8, 16), torch.randn(2, 3, 8)
    expected = x @ W.T + D
    with torch.no_grad():
        torch.testing.assert_close(dcft.linear_with_delta(x, W.T, D.clone()), expected)
    x.requires_grad_(True)
    out = dcft.linear_with_delta(x, W.T, D.clone())
    out.sum().backward()
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, W.sum(0).expand(2, 3, -1))


def test_bf16_within_tolerance():
    """bf16 keeps 8 mantissa bits: relative error of a few 1e-3, we allow 2e-2."""
    A, B, C = random_adapter(384, 384, 8, 8, 1, torch.float32)
    x = torch.randn(4, 16, 384)
    reference = dcft.factored_delta(x, A, B, C, 8)
    low = dcft.factored_delta(*(t.bfloat16() for t in (x, A, B, C)), 8)
    assert rel_err(low.float(), reference) < 2e-2


def test_orthogonal_penalty_value_and_gradient():
    A = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)  # |a|^2 = 25
    B = torch.tensor([[1.0], [0.0]], dtype=torch.float64, requires_grad=True)  # |b|^2 = 1
    penalty = dcft.orthogonal_penalty(A, B)
    assert penalty.item() == pytest.approx(24.0)
    penalty.backward()
    # d|a.a - 1|/da = 2a (a.a > 1); B sits at the minimum |b| = 1 where the gradient is zero
    torch.testing.assert_close(A.grad, 2 * A.detach())
    A2, B2, _ = random_adapter(16, 24, 4, 4, 2)
    assert torch.autograd.gradcheck(dcft.orthogonal_penalty, (A2.requires_grad_(), B2.requires_grad_()))


def test_orthonormal_factors_have_zero_penalty():
    Q, _ = torch.linalg.qr(torch.randn(12, 3, dtype=torch.float64))
    assert dcft.orthogonal_penalty(Q.T, Q).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("out_f,in_f,s,stride", [(384, 384, 7, 7), (10, 12, 4, 3), (8, 8, 4, 5), (3, 8, 4, 4)])
def test_grid_shape_rejects_untileable_layers(out_f, in_f, s, stride):
    with pytest.raises(ValueError, match=r"kernel|stride"):
        dcft.grid_shape(out_f, in_f, s, stride)
