"""`torch.ops.dcft.mixed_linear`, the mixed layer's one op: its CPU kernel against `functional.py`,
its fake implementation under torch.compile, and what a wrapped layer dispatches.

Tolerances: fp32 rtol = atol = 1e-5 (the kernel sums in another order than BLAS); bf16 rtol = atol =
2e-2 against an fp32 reference on the same rounded inputs (bf16 keeps 8 bits; outputs are O(1)).
The Triton implementation is held to the same reference in test_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from adapters import functional as dcft
from adapters.kernels import ops
from adapters.layer import DCFTLinear, LayerBank, SlotBatch
from benchmarks.dispatch import DispatchCounter

TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def banks(slots: int, out_f: int, in_f: int, s: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random A, B, C, scale banks with slot 0 all zeros (the bare backbone)."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(slots, k, in_f // s, generator=gen) / (in_f // s) ** 0.5
    B = torch.randn(slots, out_f // s, k, generator=gen)
    C = torch.randn(slots, s, s, generator=gen) / s
    scale = torch.rand(slots, generator=gen) + 0.5
    for bank in (A, B, C, scale):
        bank[0] = 0
    return A, B, C, scale


CASES = [  # (out, in, kernel, rank, rows, tokens per row, slots of the rows)
    (24, 32, 4, 1, 3, 5, (3, 0, 1)),  # a row per adapter, one bare
    (96, 64, 8, 1, 8, 1, (1, 2, 3, 4, 1, 0, 2, 4)),  # decode: one token per row
    (48, 96, 8, 2, 2, 17, (2, 2)),  # rank 2, a prefill chunk
    (16, 16, 2, 1, 4, 3, (0, 0, 0, 0)),  # every row bare: the bare layer exactly
    (40, 36, 4, 3, 3, 2, (1, 4, 2)),  # n = 9 columns: the vector path's tail after its 4 lanes
    (32, 48, 16, 1, 2, 3, (3, 1)),  # kernel 16, n = 3: the tail alone
    (18, 27, 3, 2, 3, 2, (2, 0, 4)),  # kernel 3: the generic path (kernel read at run time)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-s{c[2]}-k{c[3]}-{c[4]}x{c[5]}")
@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_cpu_kernel_matches_the_functional_reference(case, transposed, with_bias):
    out_f, in_f, s, k, rows, tokens, slots = case
    A, B, C, scale = banks(5, out_f, in_f, s, k)
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(out_f, in_f, generator=gen) / in_f**0.5
    bias = torch.randn(out_f, generator=gen) if with_bias else None
    x = torch.randn(rows, tokens, in_f, generator=gen)
    index = torch.tensor(slots)
    layout = weight.t().contiguous() if transposed else weight
    got = ops.mixed_linear(x, layout, bias, A, B, C, scale, index, transposed)
    delta = dcft.mixed_delta(x, A, B, C, scale, index, bias)  # functional.py, gathered per row
    expected = x @ weight.t() + delta
    assert got.shape == (rows, tokens, out_f)
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])


def test_bf16_on_the_cpu_kernel():
    A, B, C, scale = banks(4, 64, 32, 8, 1)
    gen = torch.Generator().manual_seed(2)
    weight, x = torch.randn(64, 32, generator=gen) / 6, torch.randn(3, 2, 32, generator=gen)
    args = [t.bfloat16() for t in (x, weight, A, B, C, scale)]
    index = torch.tensor([1, 3, 0])
    got = ops.mixed_linear(args[0], args[1], None, *args[2:], index)
    expected = ops.reference(*(t.float() for t in args[:2]), None, *(t.float() for t in args[2:]), index)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, **TOLERANCE[torch.bfloat16])


def test_one_slot_per_token_as_segments():
    """Slots given per token (row_len 1): each token reads its own slot, as continuous batching packs them."""
    A, B, C, scale = banks(4, 32, 32, 4, 1)
    weight, x = torch.randn(32, 32), torch.randn(6, 32)
    index = torch.tensor([1, 1, 0, 3, 2, 2])
    got = ops.mixed_linear(x, weight, None, A, B, C, scale, index)
    expected = ops.reference(x[:, None], weight, None, A, B, C, scale, index)[:, 0]
    torch.testing.assert_close(got, expected, **TOLERANCE[torch.float32])


def test_a_slot_outside_the_bank_is_an_error_not_a_read_out_of_bounds():
    A, B, C, scale = banks(3, 16, 16, 4, 1)
    with pytest.raises(RuntimeError, match="outside the bank"):
        ops.mixed_linear(torch.randn(2, 16), torch.randn(16, 16), None, A, B, C, scale, torch.tensor([1, 3]))
    with pytest.raises(RuntimeError, match="do not divide"):
        ops.mixed_linear(torch.randn(3, 16), torch.randn(16, 16), None, A, B, C, scale, torch.tensor([1, 2]))


def test_compiles_as_one_node_without_graph_breaks():
    """The fake implementation gives torch.compile the op's shape, so a mixed layer traces whole."""
    layer = mixed_layer()
    x = torch.randn(3, 4, 32)
    explained = torch._dynamo.explain(layer)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, backend="eager", fullgraph=True)(x), layer(x))


def mixed_layer(slot_index=(3, 0, 1)) -> DCFTLinear:
    torch.manual_seed(0)
    layer = DCFTLinear(torch.nn.Linear(32, 24))
    layer.bank = LayerBank.empty(4, (6, 8), kernel_size=4, rank=1, batch=SlotBatch())
    for slot in (1, 2, 3):
        layer.bank.write_slot(slot, torch.randn(1, 8), torch.randn(6, 1), torch.randn(4, 4) / 4, 0.5 * slot)
    layer.bank.batch.slot_index = None if slot_index is None else torch.tensor(slot_index)
    return layer


def test_a_wrapped_layer_dispatches_one_op_and_a_bare_batch_the_bare_layer_alone():
    layer, x = mixed_layer(), torch.randn(3, 4, 32)
    with torch.inference_mode(), DispatchCounter() as mixed:
        layer(x)
    assert mixed.total <= 2 and mixed.counts["dcft.mixed_linear"] == 1, mixed.counts
    layer.bank.batch.slot_index = None  # no row has an adapter: decided once per forward, by the caller
    with torch.inference_mode(), DispatchCounter() as bare_batch:
        layer(x)
    with torch.inference_mode(), DispatchCounter() as bare:
        layer.base(x)
    assert bare_batch.counts == bare.counts


def test_a_mixed_layer_asked_for_a_gradient_runs_the_reference():
    """The op has no backward: a gradient through a mixed layer takes functional.py's path."""
    layer = mixed_layer()
    x = torch.randn(3, 4, 32, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(layer(x), ops.reference(x, layer.base.weight, layer.base.bias, layer.bank.A,
                                                             layer.bank.B, layer.bank.C, layer.bank.scale,
                                                             layer.bank.batch.slot_index), rtol=1e-5, atol=1e-5)


def test_cpu_kernel_is_built_and_used():
    """The fused C++ kernel builds here (CI has a compiler): the fallback is for machines without one."""
    assert ops.cpu_kernel() == "fused"


def op_args(layer: DCFTLinear, x: torch.Tensor) -> tuple:
    bank = layer.bank
    return (x, layer.base.weight, layer.base.bias, bank.A, bank.B, bank.C, bank.scale, bank.batch.slot_index, False)


def test_the_eager_entry_gives_the_registered_ops_answer_and_the_profiler_sees_one_op():
    layer, x = mixed_layer(), torch.randn(3, 4, 32)
    with torch.inference_mode(), torch.profiler.profile() as profile:
        got = ops.mixed_linear_eager(*op_args(layer, x))
    torch.testing.assert_close(got, ops.mixed_linear(*op_args(layer, x)), rtol=0, atol=0)
    names = [event.name for event in profile.events()]
    assert names.count("dcft::mixed_linear") == 1, names


def test_the_eager_entry_goes_through_the_dispatcher_where_something_must_see_the_op():
    """A dispatch mode (the counters), fake tensors (torch.compile's) and a gradient each take the
    registered op's path, not the direct call into the kernel."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer, x = mixed_layer(), torch.randn(3, 4, 32)
    with torch.inference_mode(), DispatchCounter() as counted:
        ops.mixed_linear_eager(*op_args(layer, x))
    assert counted.counts["dcft.mixed_linear"] == 1, counted.counts
    with FakeTensorMode() as fake:
        fake_args = [fake.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in op_args(layer, x)]
        assert ops.mixed_linear_eager(*fake_args).shape == (3, 4, 24)
    wants_grad = x.clone().requires_grad_()
    # the dispatcher's autograd fallback answers, as for the registered op (layers run the reference here)
    with pytest.warns(UserWarning, match="autograd kernel was not registered"):
        ops.mixed_linear_eager(*op_args(layer, wants_grad)).sum().backward()
