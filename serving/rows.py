"""The rows a batch is made of, and what comes back for each (plain, immutable data)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ClassifyRow:
    key: str
    text: str
    text_pair: str | None = None


@dataclass(frozen=True)
class Prediction:
    label: str | None
    scores: dict[str, float] | None  # classification: probability per label
    value: float | None = None  # regression


@dataclass(frozen=True)
class GenerateRow:
    key: str | None  # None: the bare backbone
    prompt: str
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class Generation:
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length"
