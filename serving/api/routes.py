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
from serving.api.errors import ERROR_RESPONSES, error_body, naming, request_id_of, status_for
from serving.api.middleware import CLIENT_CLOSED
from serving.api.openai_format import ChatFormat, CompletionFormat, UsageTally, sse, usage_of
from serving.calls import ClassifyCall, GenerateCall
from serving.config import generation_timeout_s
from serving.errors import RequestTimeoutError

router = APIRouter(responses=ERROR_RESPONSES)


@router.post("/v1/classify", response_model=s.ClassifyResponse)
@naming("adapter")
async def classify(body: s.ClassifyRequest, who: AnyCaller, edge: EdgeState):
    ref = edge.adapter_ref(body.adapter, backbone_serves=False)
    who.check_use(ref)
    pairs = body.pairs()
    edge.check_inputs(len(pairs), [t for pair in pairs for t in pair if t])
    async with edge.admission.admit(who.tenant, "classify", ref.name) as charge:
        result = await edge.within_timeout(edge.backend.call("classify", ClassifyCall(ref, pairs)))
        charge(result.prompt_tokens)
    outputs = [s.ClassifyOutput(label=p.label, scores=p.scores, value=p.value) for p in result.predictions]
    usage = s.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=0, total_tokens=result.prompt_tokens)
    return s.ClassifyResponse(adapter=str(result.adapter), version=result.version, task_type=result.task_type,
                              results=outputs, usage=usage)


@router.post("/v1/completions", response_model=s.CompletionResponse)
@naming("model")
async def completions(body: s.CompletionRequest, request: Request, who: AnyCaller, edge: EdgeState):
    prompts = body.prompts()
    call = checked_call(edge, who, body, GenerateCall(None, prompts=prompts), prompts)
    return await answer(request, edge, who, body, call, "completions", CompletionFormat(body.model, body.n))


@router.post("/v1/chat/completions", response_model=s.ChatCompletionResponse)
@naming("model")
async def chat_completions(body: s.ChatCompletionRequest, request: Request, who: AnyCaller, edge: EdgeState):
    messages = tuple((m.template_role, m.text()) for m in body.messages)
    call = checked_call(edge, who, body, GenerateCall(None, messages=messages), [c for _, c in messages])
    return await answer(request, edge, who, body, call, "chat", ChatFormat(body.model, body.n))


def checked_call(edge: Edge, who: Caller, body: s.SamplingFields, call: GenerateCall,
                 texts: list[str]) -> GenerateCall:
    """The shared checks of completions and chat: the adapter, its owner, the limits."""
    adapter = None if body.model == edge.backbone_name else edge.adapter_ref(body.model)
    if adapter is not None:
        who.check_use(adapter)
    edge.check_inputs(len(call.prompts) or 1, texts)
    if body.asked_new_tokens is not None:
        edge.check_new_tokens(body.asked_new_tokens)
    edge.check_choices(body.n * max(1, len(call.prompts)))
    sampling = body.sampling(edge.limits.max_new_tokens)
    return replace(call, adapter=adapter, sampling=sampling, n=body.n, tenant=who.tenant)


async def answer(request: Request, edge: Edge, who: Caller, body: s.SamplingFields, call: GenerateCall, route: str,
                 form: CompletionFormat):
    name = call.adapter.name if call.adapter else None
    if body.stream:
        return await stream_answer(request, edge, who, body, call, route, name, form)
    whole = generation_timeout_s(edge.limits, call.sampling.max_tokens)
    async with edge.admission.admit(who.tenant, route, name) as charge:
        result = await edge.within_timeout(edge.backend.call("complete", call), whole)
        charge(usage_of(result, call.n).total_tokens)
    return form.response(result)


async def stream_answer(request: Request, edge: Edge, who: Caller, body: s.SamplingFields, call: GenerateCall,
                        route: str, name: str | None, form: CompletionFormat) -> StreamingResponse:
    """Server-sent events, ending with `data: [DONE]`. The first event is awaited before the
    200 goes out (within request_timeout_s), so a request that fails at once still gets its own status
    and error body. After it, each event must come within stream_idle_timeout_s and the whole stream
    within its generation bound; past either, past a drain's bound, or on a model error, an error event
    carrying the request id ends the stream, then `[DONE]`. A client that hangs up stops the generation."""
    limits = edge.limits
    deadline = time.monotonic() + generation_timeout_s(limits, call.sampling.max_tokens)
    held = AsyncExitStack()
    charge = await held.enter_async_context(edge.admission.admit(who.tenant, route, name))
    events = edge.backend.stream("stream", call)
    held.push_async_callback(events.aclose)  # closing it cancels the generation
    try:
        first = await edge.within_timeout(anext(events))
    except BaseException:
        await held.__aexit__(*sys.exc_info())  # re-raises: the error answers with its own status
        raise

    async def chunks() -> AsyncIterator[str]:
        tally = UsageTally(call.n)
        try:
            event = first
            while True:
                tally.add(event)
                yield sse(form.chunk(event))
                wait = min(limits.stream_idle_timeout_s, deadline - time.monotonic())
                event = await edge.drain.first(anext(events), max(wait, 0.001))
        except StopAsyncIteration:
            usage = tally.usage()
            charge(usage.total_tokens)
            if body.include_usage:
                yield sse(form.usage_chunk(usage))
            yield sse("[DONE]")
        except (TimeoutError, AdapterError) as err:  # the 200 went out already: the error is an event
            if not isinstance(err, AdapterError):
                err = RequestTimeoutError("the stream passed its time bound (no new token for "
                                          f"{limits.stream_idle_timeout_s:g} s, or the whole generation's)")
            request.state.outcome = status_for(err)  # what the response counts as, though it began as a 200
            yield sse(error_body(err, request_id_of(request)))
            yield sse("[DONE]")
        except (asyncio.CancelledError, GeneratorExit):
            request.state.outcome = CLIENT_CLOSED  # the client hung up mid-stream
            raise
        finally:
            await held.aclose()

    return StreamingResponse(chunks(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

