"""Inference routes: classification, and OpenAI-compatible completions and chat.

Each route parses (pydantic), authorises, checks limits, admits, makes one backend
call and formats the answer. Errors are raised, never built here (`errors.py`).
"""

from __future__ import annotations

import time
import uuid

from fastapi import APIRouter, Request

from serving.api import schemas as s
from serving.api.edge import AnyCaller, Edge, EdgeState
from serving.api.errors import ERROR_RESPONSES
from serving.service import ClassifyCall, GenerateCall, GenerateResult

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
    result = await generate(edge, request, who, body, GenerateCall(None, prompts=prompts), prompts, "completions")
    choices = [s.CompletionChoice(index=i, text=g.text, finish_reason=g.finish_reason)
               for i, g in enumerate(result.generations)]
    return s.CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                                choices=choices, usage=usage_of(result))


@router.post("/v1/chat/completions", response_model=s.ChatCompletionResponse)
async def chat_completions(body: s.ChatCompletionRequest, request: Request, who: AnyCaller, edge: EdgeState):
    messages = tuple((m.role, m.content) for m in body.messages)
    call = GenerateCall(None, messages=messages)
    result = await generate(edge, request, who, body, call, [c for _, c in messages], "chat")
    g = result.generations[0]
    choice = s.ChatChoice(index=0, message=s.AssistantMessage(content=g.text), finish_reason=g.finish_reason)
    return s.ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                                    choices=[choice], usage=usage_of(result))


async def generate(edge: Edge, request: Request, who, body: s.SamplingFields, call: GenerateCall,
                   texts: list[str], route: str) -> GenerateResult:
    """The shared half of completions and chat: the adapter, limits, admission, one call."""
    request.state.adapter_param = "model"
    adapter = None if body.model == edge.backbone_name else body.model
    name = adapter and edge.adapter_name(adapter)
    if adapter is not None:
        who.check_use(adapter)
    edge.check_inputs(len(call.prompts) or 1, texts)
    edge.check_new_tokens(body.new_tokens)
    call = GenerateCall(adapter, call.prompts, call.messages, body.sampling())
    async with edge.admission.admit(who.tenant, route, name) as charge:
        result = await edge.admission.within_timeout(edge.backend.call("generate", call))
        charge(usage_of(result).total_tokens)
    return result


def usage_of(result: GenerateResult) -> s.Usage:
    prompt = sum(g.prompt_tokens for g in result.generations)
    completion = sum(len(g.tokens) for g in result.generations)
    return s.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)
