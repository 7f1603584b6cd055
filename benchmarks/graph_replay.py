"""CUDA-graph replay for `forward --cuda-graphs`: the same GPU work as eager mode without its
per-layer host cost (Python, dispatch, kernel launches), which dominates DCFT's mixed layers on a GPU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import StaticCache

from serving.graphs import capture as capture_graph


@dataclass
class Replay:
    """A captured CUDA graph, and the tensors it reads by address, which must live as long as it."""

    graph: torch.cuda.CUDAGraph
    keep: tuple = ()

    def __call__(self) -> None:
        self.graph.replay()


def capture(call: Callable[[], object], keep: tuple = ()) -> Replay:
    """`call` captured after three warm-up runs (serving.graphs.capture)."""
    return Replay(capture_graph(call, warmups=3)[0], keep)


def slot_index_of(model: nn.Module) -> torch.Tensor | None:
    """The slot index a DCFT serving model's layers read now (None for a bare model): what a graph of
    its forward reads by address (`Replay.keep`)."""
    for module in model.modules():
        bank = getattr(module, "bank", None)
        if bank is not None:
            return bank.batch.slot_index
    return None


class StaticDecode:
    """Single-token decode steps on a static KV cache whose inputs stay the same tensors, so one CUDA
    graph can replay any step: `feed` writes the step's tokens and position, `step` runs it."""

    def __init__(self, model: nn.Module, prompt: torch.Tensor, steps: int, kwargs: dict):
        rows, self.prompt_len = prompt.shape
        self.model, self.kwargs = model, kwargs
        self.cache = StaticCache(config=model.config, max_cache_len=self.prompt_len + steps)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=prompt.device)
        self.position = torch.zeros(1, dtype=torch.long, device=prompt.device)
        positions = torch.arange(self.prompt_len, device=prompt.device)
        model(input_ids=prompt, past_key_values=self.cache, use_cache=True, cache_position=positions,
              logits_to_keep=1, **kwargs)

    def feed(self, ids: torch.Tensor, step: int) -> None:
        self.ids.copy_(ids)
        self.position.fill_(self.prompt_len + step)

    def step(self) -> torch.Tensor:
        return self.model(input_ids=self.ids, past_key_values=self.cache, use_cache=True,
                          cache_position=self.position, **self.kwargs).logits
