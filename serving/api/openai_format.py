"""Our generation results and decode events in OpenAI's response and stream-chunk shapes:
`text_completion` for /v1/completions, `chat.completion(.chunk)` for chat."""

from __future__ import annotations

import json
import time
import uuid

from serving.api import schemas as s
from serving.calls import DecodeEvent, GenerateResult, events_of
from serving.rows import TokenLogprob


class UsageTally:
    """OpenAI's usage of one completion, counted from its events as they come (streamed) or all at
    once (whole): a prompt counts once however many choices (n) it has; choice i is prompt i // n's."""

    def __init__(self, n: int):
        self.n = n
        self.prompt: dict[int, int] = {}  # prompt -> its tokens
        self.completion = 0

    def add(self, event: DecodeEvent) -> None:
        self.prompt[event.index // self.n] = self.prompt.get(event.index // self.n) or event.prompt_tokens
        self.completion += len(event.tokens)

    def usage(self) -> s.Usage:
        prompt = sum(self.prompt.values())
        return s.Usage(prompt_tokens=prompt, completion_tokens=self.completion, total_tokens=prompt + self.completion)


def usage_of(result: GenerateResult, n: int) -> s.Usage:
    tally = UsageTally(n)
    for event in events_of(result):
        tally.add(event)
    return tally.usage()


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class CompletionFormat:
    prefix, kind = "cmpl", "text_completion"

    def __init__(self, model: str, n: int):
        self.id, self.created, self.model, self.n = f"{self.prefix}-{uuid.uuid4().hex}", int(time.time()), model, n
        self.offsets: dict[int, int] = {}  # choice -> characters sent (completions' text_offset)

    def response(self, result: GenerateResult) -> s.CompletionResponse:
        choices = [s.CompletionChoice(index=i, text=g.text, finish_reason=g.finish_reason,
                                      logprobs=self._logprobs(i, g.logprobs) if g.logprobs else None)
                   for i, g in enumerate(result.generations)]
        return s.CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                    usage=usage_of(result, self.n))

    def chunk(self, event: DecodeEvent) -> dict:
        choice = s.CompletionChoice(index=event.index, text=event.text, finish_reason=event.finish_reason,
                                    logprobs=self._logprobs(event.index, event.logprobs) if event.logprobs else None)
        return self._envelope([choice.model_dump()])

    def usage_chunk(self, usage: s.Usage) -> dict:
        return self._envelope([], usage.model_dump())

    def _envelope(self, choices: list[dict], usage: dict | None = None) -> dict:
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def _logprobs(self, index: int, found: tuple[TokenLogprob, ...] | list[TokenLogprob]) -> s.CompletionLogprobs:
        offsets = []
        for lp in found:
            offsets.append(self.offsets.get(index, 0))
            self.offsets[index] = offsets[-1] + len(lp.text)
        return s.CompletionLogprobs(
            tokens=[lp.text for lp in found], token_logprobs=[lp.logprob for lp in found],
            top_logprobs=[dict(zip(lp.top_text, (v for _, v in lp.top), strict=True)) for lp in found],
            text_offset=offsets,
        )


class ChatFormat(CompletionFormat):
    prefix, kind = "chatcmpl", "chat.completion.chunk"

    def __init__(self, model: str, n: int):
        super().__init__(model, n)
        self.started: set[int] = set()  # choices whose first chunk (with the role) went out

    def response(self, result: GenerateResult) -> s.ChatCompletionResponse:
        choices = [s.ChatChoice(index=i, message=s.AssistantMessage(content=g.text), finish_reason=g.finish_reason,
                                logprobs=chat_logprobs(g.logprobs) if g.logprobs else None)
                   for i, g in enumerate(result.generations)]
        return s.ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                        usage=usage_of(result, self.n))

    def chunk(self, event: DecodeEvent) -> dict:
        role = None if event.index in self.started else "assistant"
        self.started.add(event.index)
        choice = s.ChatChunkChoice(index=event.index, delta=s.ChatDelta(role=role, content=event.text),
                                   finish_reason=event.finish_reason,
                                   logprobs=chat_logprobs(event.logprobs) if event.logprobs else None)
        return self._envelope([choice.model_dump()])


def chat_logprobs(found) -> s.ChatLogprobs:
    def top(lp: TokenLogprob) -> list[s.TopLogprob]:
        return [s.TopLogprob(token=t, logprob=v, bytes=list(t.encode())) for t, (_, v) in
                zip(lp.top_text, lp.top, strict=True)]

    return s.ChatLogprobs(content=[s.ContentLogprob(token=lp.text, logprob=lp.logprob, bytes=list(lp.text.encode()),
                                                    top_logprobs=top(lp)) for lp in found])
