"""`DCFTLinear`: a frozen linear layer (nn.Linear or GPT-2's Conv1D) plus a DCFT update.

Modes, chosen per forward:
- mixed:    a `SlotBatch` is attached and holds a slot index -> each row uses its own
            adapter from the layer's `LayerBank` (serving many adapters at once), in one
            dispatched op (`torch.ops.dcft.mixed_linear`: a fused C++ kernel on the CPU,
            Triton on CUDA); a batch with no adapter row sets no index and runs the bare layer;
- factored: the layer's own A, B, C -> x @ dW^T without building dW (training, one adapter);
- merged:   dW was added into the weight once -> the bare layer's cost per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters import functional as dcft
from adapters.config import DCFTConfig, InitScheme
from adapters.kernels import ops

PAPER_INIT_STD = 0.02


@dataclass
class SlotBatch:
    """The per-forward slot index shared by all layers of one model (set by the engine)."""

    # (rows,) long, on the model's device; None while no row of the forward has an adapter
    # (decided once per forward by whoever sets it, so every layer then runs its bare GEMM alone)
    slot_index: torch.Tensor | None = None


@dataclass
class LayerBank:
    """Stacked adapter tensors for one layer: slot i holds adapter i (slot 0 = none)."""

    A: torch.Tensor  # (slots, k, n)
    B: torch.Tensor  # (slots, m, k)
    C: torch.Tensor  # (slots, s, s)
    scale: torch.Tensor  # (slots,)
    batch: SlotBatch = field(default_factory=SlotBatch)

    @classmethod
    def empty(cls, slots: int, grid: tuple[int, int], kernel_size: int, rank: int,
              batch: SlotBatch, **like) -> LayerBank:
        """All-zero bank; a zero slot adds exactly nothing (the "none" adapter)."""
        m, n = grid
        return cls(
            A=torch.zeros(slots, rank, n, **like),
            B=torch.zeros(slots, m, rank, **like),
            C=torch.zeros(slots, kernel_size, kernel_size, **like),
            scale=torch.zeros(slots, **like),
            batch=batch,
        )

    @torch.no_grad()
    def write_slot(self, slot: int, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, scale: float) -> None:
        """Copy one adapter into `slot`; a lower rank is zero-padded, which is exact."""
        self.clear_slot(slot)
        rank = A.shape[0]
        self.A[slot, :rank].copy_(A)
        self.B[slot, :, :rank].copy_(B)
        self.C[slot].copy_(C)
        self.scale[slot] = scale

    @torch.no_grad()
    def clear_slot(self, slot: int) -> None:
        for bank in (self.A, self.B, self.C):
            bank[slot].zero_()
        self.scale[slot] = 0.0


class DCFTLinear(nn.Module):
    def __init__(self, base: nn.Module, config: DCFTConfig | None = None):
        super().__init__()
        self.base = base
        self.weight_transposed = isinstance(base, Conv1D)  # Conv1D stores (in, out)
        # A plain nn.Linear's bare forward is F.linear: calling it directly skips a module call per
        # layer, host time that is ~3% of a CPU decode step over SmolLM2's 210 wrapped layers
        self._plain_linear = type(base) is nn.Linear
        out_features, in_features = self.base_weight_t.shape[::-1]
        self.in_features, self.out_features = in_features, out_features
        self.bank: LayerBank | None = None
        self.merged = False
        self._weight_before_merge: torch.Tensor | None = None
        self.kernel_size = self.stride = 0
        self.scale = 0.0
        self.dcft_A = self.dcft_B = self.dcft_C = None
        if config is not None:
            self.add_adapter(config)

    @property
    def base_weight_t(self) -> torch.Tensor:
        """The frozen weight as (in, out), whatever the base layer's layout."""
        weight = self.base.weight
        return weight if self.weight_transposed else weight.t()

    @property
    def has_adapter(self) -> bool:
        return self.dcft_A is not None

    def add_adapter(self, config: DCFTConfig) -> None:
        """Create this layer's own trainable A, B, C (shapes checked by grid_shape)."""
        s, stride = config.kernel_size, config.effective_stride
        m, n = dcft.grid_shape(self.out_features, self.in_features, s, stride)
        like = {"device": self.base.weight.device, "dtype": self.base.weight.dtype}
        self.dcft_A = nn.Parameter(torch.empty(config.rank, n, **like))
        self.dcft_B = nn.Parameter(torch.empty(m, config.rank, **like))
        self.dcft_C = nn.Parameter(torch.empty(s, s, **like))
        self.kernel_size, self.stride, self.scale = s, stride, config.scale
        self.reset_adapter(config.init)

    def reset_adapter(self, init: InitScheme) -> None:
        with torch.no_grad():
            for param in (self.dcft_A, self.dcft_B, self.dcft_C):
                nn.init.normal_(param, std=PAPER_INIT_STD)
            if init == "zero_delta":  # LoRA-style: dW = 0 at step 0, A and C still random
                self.dcft_B.zero_()
                nn.init.normal_(self.dcft_A, std=1 / math.sqrt(self.dcft_A.shape[1]))
                nn.init.normal_(self.dcft_C, std=1 / self.kernel_size)

    def delta_weight(self) -> torch.Tensor:
        """dW in the base weight's own layout (the paper's transposed convolution)."""
        dW = dcft.delta_weight(self.dcft_A, self.dcft_B, self.dcft_C, self.stride, self.scale)
        return dW.t() if self.weight_transposed else dW

    @torch.no_grad()
    def merge(self) -> None:
        """W += dW. The pre-merge weight is kept: W + dW - dW is not W in floating point."""
        if self.has_adapter and not self.merged:
            self._weight_before_merge = self.base.weight.detach().clone()
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the exact pre-merge weight."""
        if self.merged:
            self.base.weight.copy_(self._weight_before_merge)
            self._weight_before_merge = None
            self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Every step of a served model runs this 210 times (SmolLM2): attributes are read once each.
        base, bank = self.base, self.bank
        if bank is not None and bank.batch.slot_index is not None:
            args = (x, base.weight, base.bias, bank.A, bank.B, bank.C, bank.scale, bank.batch.slot_index,
                    self.weight_transposed)
            if torch.is_grad_enabled() and x.requires_grad:  # the op has no backward; the reference has
                return ops.reference(*args)
            if torch.compiler.is_compiling():  # a graph traces the registered op: one node
                return ops.mixed_linear(*args)
            return ops.mixed_linear_eager(*args)
        if self.dcft_A is None or self.merged:
            return F.linear(x, base.weight, base.bias) if self._plain_linear else base(x)
        delta = dcft.factored_delta(x, self.dcft_A, self.dcft_B, self.dcft_C, self.stride, self.scale, base.bias)
        return dcft.linear_with_delta(x, self.base_weight_t, delta)

    def extra_repr(self) -> str:
        shape = f"in={self.in_features}, out={self.out_features}"
        return f"{shape}, kernel={self.kernel_size}, stride={self.stride}, merged={self.merged}"
