"""The model runner of continuous batching: the KV cache, a step's inputs and its forward pass
(vLLM v1's split: `decoder.py` is the scheduler and decides which rows run; this file runs them).

The cache is slotted: one row per running sequence (`rows` × `positions`), and a sequence's token at
position p sits at position p of its row, so a decode step writes each row's new key and value at its
own position (one indexed write, no shared pointer, no compaction) and reads positions [0, length) of
every row, each row masked to its own tokens. A step is therefore a function of a few static tensors:
token ids, positions and slot index, padded to a row bucket, plus the read length. On CUDA each
(row bucket, length bucket, any adapter row) step is captured once as a CUDA graph and replayed, so a
step costs one launch instead of eager mode's host time per layer; a step with no adapter row has
its own graph with the bare layers alone. On the CPU the step runs eagerly at its exact sizes
(the mixed layers are one fused op each there), or compiled by `torch.compile` with dynamic
shapes (`compile=True`): the positions are tensor values and the rows and read length symbolic
sizes, so a moving position never recompiles; each step kind (any adapter row or none, one row or
more) compiles once, which costs about 2 minutes per kind for SmolLM2 on 2 CPU cores.

Rows the scheduler leaves idle within a step (and the padding rows of a bucket) run the bare slot at
the scratch position `positions - 1`, which no sequence reaches (the context is `positions - 1`).
A prompt is prefilled straight into its row, a chunk at a time if asked, eagerly.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, StaticLayer

from serving.graphs import bucket, capture

LENGTH_BUCKET = 256  # CUDA graphs: the read length is rounded up to a multiple of this


class RowLayer(StaticLayer):
    """One layer of the slotted cache. Before each forward the runner sets where it writes (`rows` at
    `write`: a slice of positions for one row's prompt, or one position per row for a decode step) and
    what attention reads (`rows`, positions [0, read_len)); every access is a view or an indexed write."""

    rows: slice = slice(None)
    row_ids: torch.Tensor | None = None  # decode: arange(rows), paired with `write`
    write: slice | torch.Tensor = slice(0)
    read_len: int = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if isinstance(self.write, slice):  # a prompt chunk of one row
            self.keys[self.rows, :, self.write] = key_states
            self.values[self.rows, :, self.write] = value_states
        else:  # a decode step: row i writes its one new token at position write[i]
            self.keys[self.row_ids, :, self.write] = key_states[:, :, 0]
            self.values[self.row_ids, :, self.write] = value_states[:, :, 0]
        return self.keys[self.rows, :, : self.read_len], self.values[self.rows, :, : self.read_len]


@dataclass
class _StepInputs:
    """The static tensors a decode step reads (max rows each); a captured graph reads them by address."""

    ids: torch.Tensor  # (rows, 1) long
    positions: torch.Tensor  # (rows, 1) long
    slot_index: torch.Tensor  # (rows,) long
    row_ids: torch.Tensor  # (rows,) arange

    @classmethod
    def empty(cls, rows: int, device: torch.device) -> _StepInputs:
        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.long, device=device)

        return cls(zeros(rows, 1), zeros(rows, 1), zeros(rows), torch.arange(rows, device=device))


class ModelRunner:
    """Runs prefills and decode steps of a causal LM on the slotted cache.

    set_slot_index: the placement's (the slot each row of the next forward reads, or None for none).
    lock: held around every forward (the engine's: one forward at a time on the device).
    graphs: replay decode steps from CUDA graphs (CUDA only).
    compile: run decode steps through `torch.compile` (not with graphs).
    """

    def __init__(self, model: nn.Module, set_slot_index: Callable[[torch.Tensor | None], None],
                 lock: threading.Lock, device: torch.device, dtype: torch.dtype, rows: int, positions: int,
                 graphs: bool = False, compile: bool = False):
        if graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if graphs and compile:
            raise ValueError("decode steps are either replayed from CUDA graphs or compiled, not both")
        self.model, self.set_slot_index, self.lock = model, set_slot_index, lock
        self.device, self.dtype, self.rows, self.positions = device, dtype, rows, positions
        self.scratch = positions - 1  # where idle and padding rows write: no sequence gets there
        self.cache = self._new_cache()
        self.inputs = _StepInputs.empty(rows, device)
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] | None = (
            {} if graphs else None)
        self._pool = torch.cuda.graph_pool_handle() if graphs else None
        self._forward = torch.compile(self._decode_forward, dynamic=True) if compile else self._decode_forward

    @property
    def graph_keys(self) -> list[tuple[int, int, bool]]:
        """(row bucket, read length, any adapter row) of every captured decode step."""
        return sorted(self._graphs or {})

    # --- prefill ---------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, row: int, ids: Sequence[int], begin: int, slot: int) -> torch.Tensor:
        """Prompt tokens `ids`, at positions [begin, begin + len(ids)), into `row` on top of the ones
        before; the logits of the last one (vocab,)."""
        end = begin + len(ids)
        tokens = torch.tensor([list(ids)], device=self.device)
        positions = torch.arange(begin, end, device=self.device)[None]
        # query i (position begin + i) sees the row's positions 0 .. begin + i
        causal = torch.arange(end, device=self.device)[None, :] <= positions[0, :, None]
        self._set_layers(slice(row, row + 1), None, slice(begin, end), end)
        with self.lock:
            self.set_slot_index(None if slot == 0 else torch.tensor([slot], device=self.device))
            try:
                out = self.model(input_ids=tokens, position_ids=positions, attention_mask=self._additive(causal[None]),
                                 past_key_values=self.cache, use_cache=True, logits_to_keep=1)
            finally:
                self.set_slot_index(None)
        return out.logits[0, -1]

    def copy_row(self, source: int, targets: Sequence[int], length: int) -> None:
        """A prefilled prompt's first `length` positions into more rows (n choices of one prompt)."""
        for layer in self.cache.layers:
            layer.keys[list(targets), :, :length] = layer.keys[source, :, :length]
            layer.values[list(targets), :, :length] = layer.values[source, :, :length]

    # --- decode ----------------------------------------------------------------------------

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int], positions: Sequence[int | None], slots: Sequence[int]) -> torch.Tensor:
        """One token for rows 0 .. len(tokens) - 1; a row whose position is None is idle. Returns the
        rows' next-token logits (rows, vocab)."""
        count = len(tokens)
        at = [self.scratch if p is None else p for p in positions]
        read_len = max(p + 1 for p in positions if p is not None)
        mixed = any(slots)
        if self._graphs is not None:
            count, read_len = bucket(count, cap=self.rows), self._length_bucket(read_len)
        host = torch.tensor([list(tokens) + [0] * (count - len(tokens)), at + [self.scratch] * (count - len(at)),
                             list(slots) + [0] * (count - len(slots))], dtype=torch.long)
        self.inputs.ids[:count, 0].copy_(host[0])  # one copy per input, not a write per row
        self.inputs.positions[:count, 0].copy_(host[1])
        self.inputs.slot_index[:count].copy_(host[2])
        with self.lock:
            if self._graphs is None:
                logits = self._forward(count, read_len, mixed)
            else:
                logits = self._replay(count, read_len, mixed)
        return logits[: len(tokens)]

    def _decode_forward(self, count: int, read_len: int, mixed: bool) -> torch.Tensor:
        """The step on the static inputs' first `count` rows, reading positions [0, read_len)."""
        inputs = self.inputs
        positions = inputs.positions[:count]
        self._set_layers(slice(0, count), inputs.row_ids[:count], positions[:, 0], read_len)
        visible = torch.arange(read_len, device=self.device)[None, :] <= positions  # (count, read_len)
        self.set_slot_index(inputs.slot_index[:count] if mixed else None)
        try:
            out = self.model(input_ids=inputs.ids[:count], position_ids=positions,
                             attention_mask=self._additive(visible[:, None]), past_key_values=self.cache,
                             use_cache=True)
        finally:
            self.set_slot_index(None)
        return out.logits[:, -1]

    def _replay(self, count: int, read_len: int, mixed: bool) -> torch.Tensor:
        key = (count, read_len, mixed)
        if key not in self._graphs:
            graph, logits = capture(lambda: self._decode_forward(*key), self.device, self._pool)
            self._graphs[key] = graph, logits
        graph, logits = self._graphs[key]
        graph.replay()
        return logits.clone()  # the next replay rewrites the graph's output

    def _length_bucket(self, read_len: int) -> int:
        return min(-(-read_len // LENGTH_BUCKET) * LENGTH_BUCKET, self.positions)

    # --- the cache -------------------------------------------------------------------------

    def _set_layers(self, rows: slice, row_ids: torch.Tensor | None, write: slice | torch.Tensor,
                    read_len: int) -> None:
        for layer in self.cache.layers:
            layer.rows, layer.row_ids, layer.write, layer.read_len = rows, row_ids, write, read_len

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        """A boolean (rows, queries, keys) visibility as the additive 4D mask attention takes."""
        mask = torch.zeros(visible.shape, dtype=self.dtype, device=self.device)
        return mask.masked_fill_(~visible, torch.finfo(self.dtype).min)[:, None]

    def _new_cache(self) -> Cache:
        config = self.model.config
        cache = Cache(layers=[RowLayer(max_cache_len=self.positions) for _ in range(config.num_hidden_layers)])
        cache.early_initialization(self.rows, *kv_heads_and_dim(config), self.dtype, self.device)
        return cache


def kv_heads_and_dim(model_config) -> tuple[int, int]:
    """(key/value heads, head dim) of one cache layer, grouped-query attention included."""
    heads = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    return heads, head_dim


def kv_bytes_per_position(model_config, dtype: torch.dtype) -> int:
    """Bytes one cache position of one sequence takes: keys and values of every layer."""
    heads, head_dim = kv_heads_and_dim(model_config)
    return 2 * model_config.num_hidden_layers * heads * head_dim * dtype.itemsize
