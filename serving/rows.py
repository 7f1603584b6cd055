"""The rows a batch is made of, and what comes back for each (plain, immutable data).

Rows arrive already tokenised: a call's text is turned into token ids (and checked
against the context) before it joins a batch, so a malformed or oversized input
fails its own call and never the shared forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampling:
    """How one completion is decoded; travels whole from the HTTP edge to the decoder."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # ... and this much per time it was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    logprobs: int | None = None  # None: none; k: the chosen token's logprob and the top k
    # max_tokens is a ceiling, not a demand (chat without max_tokens): a prompt near the end of the
    # context decodes up to the context's end instead of being refused
    to_context: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the most likely tokens at this step, best first
    text: str = ""  # the token as text (clients see text, not ids)
    top_text: tuple[str, ...] = ()


@dataclass(frozen=True)
class ClassifyRow:
    key: str
    input_ids: tuple[int, ...]
    token_type_ids: tuple[int, ...] | None = None  # BERT-style pairs: 0 for the text, 1 for the pair


@dataclass(frozen=True)
class Prediction:
    label: str | None
    scores: dict[str, float] | None  # classification: probability per label
    value: float | None = None  # regression


@dataclass(frozen=True)
class GenerateRow:
    key: str | None  # None: the bare backbone
    prompt_ids: tuple[int, ...]
    sampling: Sampling = Sampling()
    nth: int = 0  # which of its prompt's n choices this row decodes (static batching: a row per choice)


@dataclass
class Generation:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length"
    logprobs: list[TokenLogprob] = field(default_factory=list)
