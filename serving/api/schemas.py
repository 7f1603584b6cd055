"""HTTP request and response bodies (pydantic; they are the OpenAPI spec).

Completions follow OpenAI's shape, with `model` naming the adapter
(`TENANT/TASK[@N]`) or the bare backbone, the convention vLLM and LoRAX users know.
Every text field must be valid Unicode (a lone surrogate is refused here, before it
can reach a tokenizer), every number finite, and OpenAI parameters this server does
not implement are refused by name rather than ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

from serving.rows import Sampling

MAX_TEXT = 100_000  # hard schema bound; the configured limit is usually far lower


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text is not valid Unicode (it holds a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TextPair(Strict):
    text: Text = Field(min_length=1, max_length=MAX_TEXT)
    text_pair: Text | None = Field(None, min_length=1, max_length=MAX_TEXT)


class ClassifyRequest(Strict):
    adapter: str = Field(min_length=3, max_length=200, examples=["acme/sentiment"])
    inputs: list[Text | TextPair] = Field(min_length=1, max_length=10_000, examples=[["a gripping, funny film"]])

    def pairs(self) -> tuple[tuple[str, str | None], ...]:
        return tuple((i, None) if isinstance(i, str) else (i.text, i.text_pair) for i in self.inputs)


class ClassifyOutput(BaseModel):
    label: str | None = None
    scores: dict[str, float] | None = None
    value: float | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ClassifyResponse(BaseModel):
    adapter: str
    version: int
    task_type: str
    results: list[ClassifyOutput]
    usage: Usage


# OpenAI parameters this server does not implement yet, with the values that mean "off":
# a request may send those (clients often do), any other value is refused by name.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "stream": (None, False),
    "stream_options": (None,),
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    "modalities": (None, ["text"]),
}


class SamplingFields(Strict):
    model: str = Field(min_length=1, max_length=200, examples=["acme/reviews"])
    max_tokens: int | None = Field(None, ge=1, le=8192, description="Default 16.")
    max_completion_tokens: int | None = Field(None, ge=1, le=8192, description="OpenAI's newer name for max_tokens.")
    temperature: float = Field(1.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Text | list[Text] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    user: Text | None = Field(None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for name, neutral in NEUTRAL_VALUES.items():
            if name in data and data.pop(name) not in neutral:
                raise PydanticCustomError(
                    "unsupported_parameter", "parameter '{name}' is not supported by this server", {"name": name}
                )
        return data

    @property
    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 16

    def sampling(self) -> Sampling:
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return Sampling(self.new_tokens, self.temperature, self.top_p, tuple(s for s in stops if s), self.seed)


class CompletionRequest(SamplingFields):
    prompt: Text | list[Annotated[Text, Field(min_length=1)]] = Field(min_length=1, max_length=10_000)

    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)


class ChatMessage(Strict):
    role: Literal["system", "user", "assistant"]
    content: Text = Field(max_length=MAX_TEXT)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)


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


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    request_id: str | None = None


class ErrorBody(BaseModel):
    """Every error answer, on every route (OpenAI's shape)."""

    error: ErrorDetail
