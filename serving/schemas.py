"""HTTP request and response bodies (pydantic; they are the OpenAPI spec).

Completions follow OpenAI's shape, with `model` naming the adapter
(`TENANT/TASK[@N]`) or the bare backbone, the convention vLLM and LoRAX users know.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_TEXT = 100_000  # hard schema bound; the configured limit is usually far lower


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPair(Strict):
    text: str = Field(min_length=1, max_length=MAX_TEXT)
    text_pair: str | None = Field(None, min_length=1, max_length=MAX_TEXT)


class ClassifyRequest(Strict):
    adapter: str = Field(min_length=3, max_length=200, examples=["acme/sentiment"])
    inputs: list[str | TextPair] = Field(min_length=1, max_length=10_000, examples=[["a gripping, funny film"]])


class ClassifyOutput(BaseModel):
    label: str | None = None
    scores: dict[str, float] | None = None
    value: float | None = None


class ClassifyResponse(BaseModel):
    adapter: str
    version: int
    task_type: str
    results: list[ClassifyOutput]


class SamplingFields(Strict):
    model: str = Field(min_length=1, max_length=200, examples=["acme/reviews"])
    max_tokens: int = Field(16, ge=1, le=8192)
    temperature: float = Field(1.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: Literal[1] = 1
    stream: Literal[False] = False
    user: str | None = Field(None, max_length=256)

    def stop_list(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return tuple(s for s in stops if s)


class CompletionRequest(SamplingFields):
    prompt: str | list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=10_000)


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_TEXT)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    owned_by: str
    version: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadRequest(Strict):
    pin: bool = False


class ErrorBody(BaseModel):
    error: dict[str, str]
