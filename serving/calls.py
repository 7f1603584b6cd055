"""The contract between the HTTP edge and the model side: the calls the edge makes, what comes
back, the stream's events, and the backend protocol that carries them (vLLM's request/output types,
in our words). Plain, immutable data that imports no model code, so `serving/api/` and the Ingress
process need neither torch nor the engine: the edge imports this module, the errors and the
configs, never the engine, the decoder or the bank.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from adapters.errors import AdapterError
from adapters.store.names import AdapterRef, as_ref
from serving.fleet import ReplicaView
from serving.rows import Generation, Prediction, Sampling, TokenLogprob

# What the edge may call on the model side, by name (`ModelService`'s methods).
ModelMethod = Literal["classify", "complete", "load", "unload", "reload", "sync", "status", "metrics_text"]
StreamMethod = Literal["stream"]


@dataclass(frozen=True)
class ClassifyCall:
    adapter: AdapterRef  # parsed once, at the edge; nothing below it splits a name
    inputs: tuple[tuple[str, str | None], ...]  # (text, text_pair)

    def __post_init__(self):  # a library caller may name the adapter as text: parsed here, once
        object.__setattr__(self, "adapter", as_ref(self.adapter))


@dataclass(frozen=True)
class ClassifyResult:
    adapter: AdapterRef
    version: int
    task_type: str
    predictions: list[Prediction]
    prompt_tokens: int


@dataclass(frozen=True)
class GenerateCall:
    """Prompts, or one chat (`messages`, rendered with the backbone's template in the replica)."""

    adapter: AdapterRef | None  # None: the bare backbone
    prompts: tuple[str, ...] = ()
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    sampling: Sampling = Sampling()
    n: int = 1  # choices per prompt
    tenant: str = ""  # who asked: the decoder's queue is fair between tenants

    def __post_init__(self):
        if self.adapter is not None:
            object.__setattr__(self, "adapter", as_ref(self.adapter))


@dataclass(frozen=True)
class GenerateResult:
    adapter: AdapterRef | None
    version: int | None
    generations: list[Generation]


@dataclass(frozen=True)
class DecodeEvent:
    """What one choice produced in one step (or its end)."""

    index: int
    text: str = ""
    tokens: tuple[int, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: str | None = None  # set on the choice's last event: stop | length
    prompt_tokens: int = 0
    error: AdapterError | None = None  # the request failed; no more events follow for it


class Backend(Protocol):
    """How the edge reaches the model side: in process (`serving.backend.LocalBackend`) or on Ray
    Serve replicas (`serving.deployment.RayBackend`). Methods take and return the plain data above,
    or raise one of our `AdapterError`s."""

    async def call(self, method: ModelMethod, *args: Any) -> Any: ...

    def stream(self, method: StreamMethod, *args: Any) -> AsyncIterator[Any]:
        """The method's items as they come; closing the iterator cancels the work."""

    async def replicas(self) -> list[ReplicaView]:
        """The live model replicas and what each last reported."""


def raise_if_error(result):
    if isinstance(result, AdapterError):
        raise result
    return result


def events_of(result: GenerateResult) -> list[DecodeEvent]:
    """A whole (statically batched) answer as one event per choice."""
    return [DecodeEvent(i, g.text, tuple(g.tokens), tuple(g.logprobs), g.finish_reason, g.prompt_tokens)
            for i, g in enumerate(result.generations)]


def add_event(out: Generation, event: DecodeEvent) -> None:
    """Fold one of a choice's events into its whole answer (the inverse of `events_of`)."""
    out.text += event.text
    out.tokens += event.tokens
    out.logprobs += event.logprobs
    out.prompt_tokens = out.prompt_tokens or event.prompt_tokens
    out.finish_reason = event.finish_reason
