"""Classify forwards replayed from CUDA graphs, one graph per (rows, tokens) bucket, and a separate
one per bucket for batches with no adapter row (the bare layers alone).

On a GPU, eager mode pays 0.1-0.2 ms of host time (Python, dispatch, kernel launches) per
wrapped DCFT layer, more than the layer's own GPU work at serving sizes
(benchmarks/results/forward_cuda.md). A replayed graph pays that once per forward.

Each batch is padded up to its bucket: padded tokens are masked out and padded rows run
the bare slot and are dropped, so the real rows get the eager forward's outputs up to
rounding (other shapes may pick other GEMM tilings). The graph reads its inputs, the slot
index and the adapter bank by address: every call copies into the same static tensors, and
the bank is written in place (`LayerBank.write_slot`), never reallocated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

MIN_TOKENS = 16  # token buckets: powers of two from here up to the context


def bucket(n: int, floor: int = 1, cap: int | None = None) -> int:
    """The power of two >= n (at least `floor`), or `cap` where that is smaller."""
    size = max(floor, 1 << max(n - 1, 0).bit_length())
    return size if cap is None else min(size, cap)


def pad_batch(encoded: dict[str, torch.Tensor], rows: int, tokens: int) -> dict[str, torch.Tensor]:
    """`encoded` (r, t) padded to (rows, tokens) with zeros; each padded row attends to its first token
    only, so no row is fully masked (a fully masked row can turn into NaN in attention)."""
    padded = {}
    for name, value in encoded.items():
        out = value.new_zeros(rows, tokens)
        out[: value.shape[0], : value.shape[1]] = value
        padded[name] = out
    padded["attention_mask"][encoded["attention_mask"].shape[0] :, 0] = 1
    return padded


def capture(call: Callable[[], object], device: torch.device | None = None, pool=None,
            warmups: int = 2) -> tuple[torch.cuda.CUDAGraph, object]:
    """`call` run `warmups` times on a side stream (Triton autotunes and compiles there, outside the
    graph), then captured; returns the graph and what the captured call returned, which each replay rewrites.
    thread_local: other threads may keep using the GPU (an adapter load) while this one captures."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            call()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        output = call()
    return graph, output


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: dict[str, torch.Tensor]  # static (rows, tokens) tensors the graph reads
    slot_index: torch.Tensor  # static (rows,) slot of each row, read by every wrapped layer
    pooled: torch.Tensor  # static (rows, hidden) output the graph writes


class EncoderGraphs:
    """An encoder's pooled output for a batch, by replaying the graph of the batch's bucket (CUDA only).

    set_slot_index: the placement's, so the layers read the graph's static slot index while it is
    captured. Graphs are captured on a bucket's first use and share one memory pool; calls must
    not overlap (the engine holds its lock around each).
    """

    def __init__(self, model: nn.Module, set_slot_index: Callable[[torch.Tensor | None], None],
                 device: torch.device, context: int):
        if device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self._model, self._set_slot_index, self._device, self._context = model, set_slot_index, device, context
        self._graphs: dict[tuple[int, int, bool], _Captured] = {}  # (rows, tokens, any adapter row)
        self._pool = torch.cuda.graph_pool_handle()

    @property
    def buckets(self) -> list[tuple[int, int, bool]]:
        return sorted(self._graphs)

    def pooled(self, encoded: dict[str, torch.Tensor], slot_index: torch.Tensor | None) -> torch.Tensor:
        """slot_index: (rows,) each row's slot, or None when no row has an adapter (the bare graph)."""
        rows, tokens = encoded["input_ids"].shape
        key = (bucket(rows), bucket(tokens, MIN_TOKENS, self._context), slot_index is not None)
        captured = self._graphs.get(key) or self._capture(key, sorted(encoded))
        for name, value in pad_batch(encoded, *key[:2]).items():
            captured.inputs[name].copy_(value)
        if slot_index is not None:
            captured.slot_index.zero_()  # padded rows: the bare slot
            captured.slot_index[:rows].copy_(slot_index)
        captured.graph.replay()
        return captured.pooled[:rows].clone()  # another bucket's replay may reuse this memory

    def _capture(self, key: tuple[int, int, bool], names: list[str]) -> _Captured:
        rows, tokens, mixed = key
        inputs = {name: torch.zeros(rows, tokens, dtype=torch.long, device=self._device) for name in names}
        inputs["attention_mask"][:, 0] = 1
        slot_index = torch.zeros(rows, dtype=torch.long, device=self._device)

        def forward() -> torch.Tensor:
            self._set_slot_index(slot_index if mixed else None)  # the bare graph runs the bare layers alone
            return self._model(**inputs).pooler_output

        try:
            graph, pooled = capture(forward, self._device, self._pool)
        finally:
            self._set_slot_index(None)
        self._graphs[key] = _Captured(graph, inputs, slot_index, pooled)
        return self._graphs[key]
