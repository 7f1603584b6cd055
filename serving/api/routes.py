"""Inference routes: classification, and OpenAI-compatible completions and chat.

Each route parses (pydantic), authorises, checks limits, admits, makes one backend
call and formats the answer. Errors are raised, never built here (`errors.py`).
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from adapters.errors import AdapterError
from serving.api import schemas as s
from serving.api.auth import Caller
from serving.api.edge import AnyCaller, Edge, EdgeState
from serving.api.errors import ERROR_RESPONSES, error_body
from serving.api.openai_format import ChatFormat, CompletionFormat, sse, usage_of
from serving.errors import RequestTimeoutError
from serving.service import ClassifyCall, GenerateCall

router = APIRouter(responses=ERROR_RESPONSES)


@router.post("/v1/classify", response_model=s.ClassifyResponse)
async def classify(body: s.ClassifyRequest, request: Request, who: AnyCaller, edge: EdgeState):
    request.state.adapter_param = "adapter"
    name = edge.adapter_name(body.adapter)
    who.check_use(body.adapter)
    pairs = body.pairs()
    edge.check_inputs(len(pairs), [t for pair in pairs for t in pair if t])
    async with edge.admission.admit(who.tenant, "classify", name) as charge:
        result = await edge.admission.within_timeout(edge.backend.call("classify", ClassifyCall(body.adapter, pairs)))
        charge(result.prompt_tokens)
    outputs = [s.ClassifyOutput(label=p.label, scores=p.scores, value=p.value) for p in result.predictions]
    usage = s.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=0, total_tokens=result.prompt_tokens)
    return s.ClassifyResponse(adapter=result.adapter, version=result.version, task_type=result.task_type,
                              results=outputs, usage=usage)


@router.post("/v1/completions", response_model=s.CompletionResponse)
async def completions(body: s.CompletionRequest, request: Request, who: AnyCaller, edge: EdgeState):
    prompts = body.prompts()
    call = checked_call(edge, request, who, body, GenerateCall(None, prompts=prompts), prompts)
    return await answer(edge, who, body, call, "completions", CompletionFormat(body.model, body.n))


@router.post("/v1/chat/completions", response_model=s.ChatCompletionResponse)
async def chat_completions(body: s.ChatCompletionRequest, request: Request, who: AnyCaller, edge: EdgeState):
    messages = tuple((m.role, m.content) for m in body.messages)
    call = checked_call(edge, request, who, body, GenerateCall(None, messages=messages), [c for _, c in messages])
    return await answer(edge, who, body, call, "chat", ChatFormat(body.model, body.n))


def checked_call(edge: Edge, request: Request, who: Caller, body: s.SamplingFields, call: GenerateCall,
                 texts: list[str]) -> GenerateCall:
    """The shared checks of completions and chat: the adapter, its owner, the limits."""
    request.state.adapter_param = "model"
    adapter = None if body.model == edge.backbone_name else body.model
    if adapter is not None:
        edge.adapter_name(adapter)
        who.check_use(adapter)
    edge.check_inputs(len(call.prompts) or 1, texts)
    edge.check_new_tokens(body.new_tokens)
    edge.check_choices(body.n * max(1, len(call.prompts)))
    return replace(call, adapter=adapter, sampling=body.sampling(), n=body.n, tenant=who.tenant)


async def answer(edge: Edge, who: Caller, body: s.SamplingFields, call: GenerateCall, route: str,
                 form: CompletionFormat):
    name = call.adapter and edge.adapter_name(call.adapter)
    if body.stream:
        return await stream_answer(edge, who, body, call, route, name, form)
    async with edge.admission.admit(who.tenant, route, name) as charge:
        result = await edge.admission.within_timeout(edge.backend.call("complete", call))
        charge(usage_of(result, call.n).total_tokens)
    return form.response(result)


async def stream_answer(edge: Edge, who: Caller, body: s.SamplingFields, call: GenerateCall, route: str,
                        name: str | None, form: CompletionFormat) -> StreamingResponse:
    """Server-sent events, ending with `data: [DONE]`. The first event is awaited before the
    200 goes out, so a request that fails at once still gets its own status and error body.
    A client that hangs up, or a stream past request_timeout_s, stops the generation."""
    deadline = time.monotonic() + edge.limits.request_timeout_s
    held = AsyncExitStack()
    charge = await held.enter_async_context(edge.admission.admit(who.tenant, route, name))
    events = edge.backend.stream("stream", call)
    held.push_async_callback(events.aclose)  # closing it cancels the generation
    try:
        first = await edge.admission.within_timeout(anext(events))
    except BaseException:
        await held.__aexit__(*sys.exc_info())  # re-raises: the error answers with its own status
        raise

    async def chunks() -> AsyncIterator[str]:
        tokens = {}  # choice -> (prompt tokens, completion tokens)
        try:
            event = first
            while True:
                prompt, made = tokens.get(event.index, (0, 0))
                tokens[event.index] = (prompt or event.prompt_tokens, made + len(event.tokens))
                yield sse(form.chunk(event))
                left = deadline - time.monotonic()
                event = await asyncio.wait_for(anext(events), max(left, 0.001))
        except StopAsyncIteration:
            usage = stream_usage(tokens, call.n)
            charge(usage.total_tokens)
            if body.include_usage:
                yield sse(form.usage_chunk(usage))
            yield sse("[DONE]")
        except (TimeoutError, AdapterError) as err:  # the 200 went out already: the error is an event
            err = err if isinstance(err, AdapterError) else RequestTimeoutError(
                f"the model did not finish within {edge.limits.request_timeout_s:g} s")
            yield sse(error_body(err))
        finally:
            await held.aclose()

    return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def stream_usage(tokens: dict[int, tuple[int, int]], n: int) -> s.Usage:
    prompt = sum(p for index, (p, _) in tokens.items() if index % n == 0)
    completion = sum(made for _, made in tokens.values())
    return s.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
