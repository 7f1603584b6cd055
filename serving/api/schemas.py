"""HTTP request and response bodies (pydantic; they are the OpenAPI spec).

Completions follow OpenAI's shape, with `model` naming the adapter
(`TENANT/TASK[@N]`) or the bare backbone, the convention vLLM and LoRAX users know.
Every text field must be valid Unicode (a lone surrogate is refused here, before it
can reach a tokenizer), every number finite, and OpenAI parameters this server does
not implement are refused by name rather than ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

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
    inputs: list[Annotated[Text, Field(min_length=1)] | TextPair] = Field(
        min_length=1, max_length=10_000, examples=[["a gripping, funny film"]])

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


# OpenAI parameters this server does not implement, with the values that mean "off": a
# request may send those (clients often do), any other value is refused by name.
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "audio": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
}


class StreamOptions(Strict):
    include_usage: bool = False


class ResponseFormat(Strict):
    type: Literal["text"] = Field(description="Only plain text; JSON modes are not supported.")


class SamplingFields(Strict):
    model: str = Field(min_length=1, max_length=200, examples=["acme/reviews"])
    max_tokens: int | None = Field(None, ge=1, le=131_072,
                                   description="Default: 16 for completions; for chat, the rest of the context up "
                                   "to the server's limit.")
    max_completion_tokens: int | None = Field(None, ge=1, le=131_072, description="OpenAI's newer name for max_tokens.")
    temperature: float = Field(1.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: Text | list[Text] | None = Field(None, max_length=4)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    n: int = Field(1, ge=1, le=128, description="Choices per prompt (the server's limit may be lower).")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[Annotated[str, Field(pattern=r"^\d{1,9}$")], Annotated[float, Field(ge=-100, le=100)]] | None = (
        Field(None, max_length=300, description="Token id (as a string) -> bias added to its logit.")
    )
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
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

    # OpenAI's default when max_tokens is not given: 16 for completions; for chat (None) the rest of the
    # context, up to the server's limit
    default_new_tokens: ClassVar[int | None] = 16

    @property
    def asked_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def top_logprobs_asked(self) -> int | None:
        """None: no logprobs; k: the chosen token's logprob and the k most likely."""
        return None

    def sampling(self, limit: int) -> Sampling:
        """The sampling settings; `limit` is the server's max_tokens, the ceiling of chat's default."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        bias = tuple((int(token), value) for token, value in (self.logit_bias or {}).items())
        asked = self.asked_new_tokens
        to_context = asked is None and self.default_new_tokens is None
        return Sampling(asked or self.default_new_tokens or limit, self.temperature, self.top_p,
                        tuple(s for s in stops if s), self.seed, self.presence_penalty, self.frequency_penalty, bias,
                        self.top_logprobs_asked(), to_context)


class CompletionRequest(SamplingFields):
    prompt: Text | list[Annotated[Text, Field(min_length=1)]] = Field(min_length=1, max_length=10_000)
    logprobs: int | None = Field(None, ge=0, le=20, description="Logprobs of the chosen and this many top tokens.")

    def prompts(self) -> tuple[str, ...]:
        return (self.prompt,) if isinstance(self.prompt, str) else tuple(self.prompt)

    def top_logprobs_asked(self) -> int | None:
        return self.logprobs


class TextPart(Strict):
    type: Literal["text"]
    text: Text = Field(max_length=MAX_TEXT)


class ChatMessage(Strict):
    """OpenAI's message shapes for text: content as a string or a list of text parts, an optional
    `name`, the `developer` role (a system message for the template), and an assistant turn whose
    content is null. Other parts (images, audio, files) are refused by name."""

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = Field(max_length=MAX_TEXT)
    name: Text | None = Field(None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _text_parts_only(cls, data: Any) -> Any:
        parts = data.get("content") if isinstance(data, dict) else None
        for part in parts if isinstance(parts, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" and isinstance(kind, str):
                raise PydanticCustomError("unsupported_content", "content parts of type '{kind}' are not supported "
                                          "by this server; send text parts", {"kind": kind[:40]})
        return data

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise PydanticCustomError("missing", "content is required")
        return self

    @property
    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role

    def text(self) -> str:
        """The content as one string: text parts joined by newlines, null as empty."""
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    default_new_tokens: ClassVar[int | None] = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def top_logprobs_asked(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None  # a streamed chunk carries usage only at the end, when asked


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ContentLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ContentLogprob]


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChatLogprobs | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


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
    created: int  # Unix seconds: when this version was published (the backbone: when the server started)
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


# --- fine-tuning (OpenAI's files and fine_tuning.jobs) -------------------------------------------

Auto = Literal["auto"]


class HyperparametersIn(Strict):
    n_epochs: Annotated[int, Field(ge=1, le=1000)] | Auto = "auto"
    batch_size: Annotated[int, Field(ge=1, le=1024)] | Auto = "auto"
    learning_rate_multiplier: Annotated[float, Field(gt=0)] | Auto = "auto"


class DCFTMethodIn(Strict):
    """DCFT's own settings; unset ones follow the serving replicas' (kernel size, targets)."""

    kernel_size: int | None = Field(None, ge=1, le=128)
    stride: int | None = Field(None, ge=1, le=128)
    targets: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(None, min_length=1,
                                                                                       max_length=64)
    learning_rate: float | None = Field(None, gt=0, le=10)
    gamma: float | None = Field(None, ge=0, le=100)
    hyperparameters: HyperparametersIn | None = None


class SupervisedMethodIn(Strict):
    hyperparameters: HyperparametersIn | None = None


class MethodIn(Strict):
    """`{"type": "dcft", "dcft": {...}}`, or OpenAI's `{"type": "supervised", "supervised": {...}}`."""

    type: Literal["dcft", "supervised"] = "dcft"
    dcft: DCFTMethodIn | None = None
    supervised: SupervisedMethodIn | None = None


class JobCreateRequest(Strict):
    model: str = Field(min_length=1, max_length=200, description="The backbone this server serves.")
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, min_length=1, max_length=64)
    suffix: str | None = Field(None, min_length=1, max_length=64,
                               description="The task name: the result is published as TENANT/SUFFIX@N.")
    hyperparameters: HyperparametersIn | None = None
    method: MethodIn | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = Field(
        None, max_length=16)
    integrations: list[Any] | None = Field(None, max_length=0, description="Not supported: leave it out.")

    def chosen_hyperparameters(self) -> HyperparametersIn:
        """The method's hyperparameters over the top-level ones (OpenAI's newer place for them)."""
        inner = self.method and (self.method.dcft or self.method.supervised)
        return (inner and inner.hyperparameters) or self.hyperparameters or HyperparametersIn()


class ListPage(BaseModel):
    object: Literal["list"] = "list"
    data: list[Any]
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True
