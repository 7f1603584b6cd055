"""Counting the aten (and custom) ops a call dispatches: the host cost eager mode pays per op,
whatever the op's math, which is what a wrapped layer adds on a GPU (and ~2-3 us each on a CPU).

    with DispatchCounter() as counter:
        model(**inputs)
    counter.total, counter.counts.most_common(5)

Used by `python -m benchmarks decode` (its dispatch table) and by the tests that hold a wrapped
layer to at most two dispatched ops.
"""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode


class DispatchCounter(TorchDispatchMode):
    """Counts every op dispatched inside the block, by name (`aten.addmm`, `dcft.mixed_linear`, ...).
    An op that calls others inside its own implementation counts once: the mode is off in there."""

    def __init__(self):
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[f"{func.namespace}.{func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())
