"""The HTTP edge (FastAPI): parse, authorise, call the backend, map errors. Nothing else.

Every error of ours maps to one status code in `STATUS`; the body is always
{"error": {"type", "message"}}. Overload answers 503 with Retry-After.
"""

import asyncio
import time
import uuid
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Header
from fastapi.responses import JSONResponse, Response

from adapters.errors import (
    AccessDeniedError,
    AdapterConfigError,
    AdapterError,
    AdapterFileError,
    AdapterNotFoundError,
    BaseModelMismatchError,
    RegistryError,
    RegistryUnavailableError,
)
from adapters.registry import AdapterHub, AdapterRef
from serving import schemas as s
from serving.auth import PUBLIC_TENANT, Caller, KeyRing, UnauthenticatedError
from serving.backend import Backend, ReplicaUnavailableError
from serving.bank import BankFullError
from serving.config import LimitsConfig
from serving.metrics import RequestMetrics
from serving.service import ClassifyCall, GenerateCall, WrongTaskError


class OverloadedError(AdapterError):
    """Too many requests in flight (503 + Retry-After)."""


class LimitError(AdapterConfigError):
    """A request over the configured limits (413)."""


class RequestTimeoutError(AdapterError):
    """The model call did not finish within limits.request_timeout_s (504)."""


# Most specific first: the first matching class decides the status.
STATUS: list[tuple[type[Exception], int]] = [
    (UnauthenticatedError, 401),
    (AccessDeniedError, 403),
    (AdapterNotFoundError, 404),
    (LimitError, 413),
    (WrongTaskError, 400),
    (BankFullError, 503),
    (OverloadedError, 503),
    (RegistryUnavailableError, 503),
    (ReplicaUnavailableError, 503),
    (RequestTimeoutError, 504),
    (BaseModelMismatchError, 422),
    (AdapterFileError, 422),
    (RegistryError, 400),
    (AdapterConfigError, 400),
    (AdapterError, 400),
]


def status_for(err: Exception) -> int:
    return next((code for cls, code in STATUS if isinstance(err, cls)), 500)


def error_response(err: Exception) -> JSONResponse:
    code = status_for(err)
    headers = {"Retry-After": "1"} if code == 503 else None
    message = "internal error" if code == 500 else str(err)
    body = {"error": {"type": type(err).__name__, "message": message}}
    if code == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(body, status_code=code, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse bodies over `max_bytes` (declared or streamed) with 413."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await error_response(LimitError(f"request body over {self.max_bytes} bytes"))(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise LimitError(f"request body over {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


def create_app(backend: Backend, keys: KeyRing, limits: LimitsConfig, hub: AdapterHub, backbone_name: str) -> FastAPI:
    metrics = RequestMetrics()
    in_flight = 0

    @asynccontextmanager
    async def admitted(route: str, adapter: str | None):
        nonlocal in_flight
        if in_flight >= limits.max_queued_requests:
            raise OverloadedError(f"{in_flight} requests in flight; retry shortly")
        in_flight += 1
        metrics.queue_depth.set(in_flight)
        start, status = time.perf_counter(), 500
        try:
            yield
            status = 200
        except Exception as err:
            status = status_for(err)
            raise
        finally:
            in_flight -= 1
            metrics.queue_depth.set(in_flight)
            metrics.observe_request(adapter, route, status, time.perf_counter() - start)

    async def within_timeout(call):
        try:
            return await asyncio.wait_for(call, limits.request_timeout_s)
        except TimeoutError:
            raise RequestTimeoutError(f"the model did not answer within {limits.request_timeout_s:g} s") from None

    def caller(authorization: Annotated[str | None, Header()] = None) -> Caller:
        return keys.authenticate(authorization)

    def admin(who: Annotated[Caller, Depends(caller)]) -> Caller:
        if not who.is_admin:
            raise AccessDeniedError(f"tenant '{who.tenant}' is not an admin")
        return who

    def adapter_or_none(model: str) -> str | None:
        return None if model == backbone_name else model

    def check_inputs(count: int, texts: list[str]) -> None:
        if count > limits.max_inputs_per_request:
            raise LimitError(f"{count} inputs in one request; the limit is {limits.max_inputs_per_request}")
        longest = max((len(t) for t in texts), default=0)
        if longest > limits.max_input_chars:
            raise LimitError(f"an input has {longest} characters; the limit is {limits.max_input_chars}")

    app = FastAPI(title="dcft-hub", version="0.1.0", description="Serve many DCFT adapters on one frozen backbone.")
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_exception_handler(AdapterError, lambda request, err: error_response(err))

    @app.post("/v1/classify", response_model=s.ClassifyResponse)
    async def classify(body: s.ClassifyRequest, who: Annotated[Caller, Depends(caller)]):
        who.check_use(body.adapter)
        pairs = [(i, None) if isinstance(i, str) else (i.text, i.text_pair) for i in body.inputs]
        check_inputs(len(pairs), [t for pair in pairs for t in pair if t])
        async with admitted("classify", AdapterRef.parse(body.adapter).name):
            result = await within_timeout(backend.classify(ClassifyCall(body.adapter, tuple(pairs))))
        outputs = [s.ClassifyOutput(label=p.label, scores=p.scores, value=p.value) for p in result.predictions]
        return s.ClassifyResponse(
            adapter=result.adapter, version=result.version, task_type=result.task_type, results=outputs
        )

    async def run_generation(body: s.SamplingFields, prompts: list[str], who: Caller, route: str):
        adapter = adapter_or_none(body.model)
        if adapter is not None:
            who.check_use(adapter)
        check_inputs(len(prompts), prompts)
        if body.max_tokens > limits.max_new_tokens:
            raise AdapterConfigError(f"max_tokens is {body.max_tokens}; the limit is {limits.max_new_tokens}")
        call = GenerateCall(
            adapter, tuple(prompts), body.max_tokens, body.temperature, body.top_p, body.stop_list(), body.seed
        )
        async with admitted(route, adapter and AdapterRef.parse(adapter).name):
            return await within_timeout(backend.generate(call))

    def usage(generations) -> s.Usage:
        prompt = sum(g.prompt_tokens for g in generations)
        completion = sum(len(g.tokens) for g in generations)
        return s.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    @app.post("/v1/completions", response_model=s.CompletionResponse)
    async def completions(body: s.CompletionRequest, who: Annotated[Caller, Depends(caller)]):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise LimitError("prompt list is empty")
        result = await run_generation(body, prompts, who, "completions")
        choices = [s.CompletionChoice(index=i, text=g.text, finish_reason=g.finish_reason)
                   for i, g in enumerate(result.generations)]  # fmt: skip
        return s.CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                                    choices=choices, usage=usage(result.generations))  # fmt: skip

    @app.post("/v1/chat/completions", response_model=s.ChatCompletionResponse)
    async def chat_completions(body: s.ChatCompletionRequest, who: Annotated[Caller, Depends(caller)]):
        prompt = await backend.chat_prompt([m.model_dump() for m in body.messages])
        result = await run_generation(body, [prompt], who, "chat")
        g = result.generations[0]
        choice = s.ChatChoice(index=0, message=s.AssistantMessage(content=g.text), finish_reason=g.finish_reason)
        return s.ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=body.model,
                                        choices=[choice], usage=usage([g]))  # fmt: skip

    def visible(who: Caller):
        if who.is_admin:
            return hub.list()
        mine = hub.list(tenant=who.tenant)
        return mine + (hub.list(tenant=PUBLIC_TENANT) if who.tenant != PUBLIC_TENANT else [])

    @app.get("/v1/models", response_model=s.ModelList)
    async def models(who: Annotated[Caller, Depends(caller)]):
        cards = [s.ModelCard(id=backbone_name, owned_by="dcft-hub")]
        cards += [s.ModelCard(id=v.name, owned_by=v.tenant, version=v.version) for v in visible(who)]
        return s.ModelList(data=cards)

    @app.get("/v1/adapters")
    async def list_adapters(who: Annotated[Caller, Depends(caller)]):
        return {"adapters": [v.model_dump(mode="json") for v in visible(who)]}

    @app.post("/v1/adapters/reload")
    async def reload_all(who: Annotated[Caller, Depends(admin)]):
        """What the registry watcher does each poll: pick up new versions of every adapter in use."""
        return await backend.reload(None)

    @app.post("/v1/adapters/{tenant}/{task}/load")
    async def load(tenant: str, task: str, who: Annotated[Caller, Depends(caller)], body: s.LoadRequest | None = None):
        ref = f"{tenant}/{task}"
        who.check_manage(ref)
        return await backend.load(ref, bool(body and body.pin))

    @app.post("/v1/adapters/{tenant}/{task}/unload")
    async def unload(tenant: str, task: str, who: Annotated[Caller, Depends(caller)]):
        ref = f"{tenant}/{task}"
        who.check_manage(ref)
        return await backend.unload(ref)

    @app.post("/v1/adapters/{tenant}/{task}/reload")
    async def reload(tenant: str, task: str, who: Annotated[Caller, Depends(caller)]):
        ref = f"{tenant}/{task}"
        who.check_manage(ref)
        return await backend.reload(AdapterRef.parse(ref).name)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        return {"status": "ready", **(await backend.status())}

    @app.get("/metrics")
    async def prometheus(who: Annotated[Caller, Depends(admin)]):
        text = metrics.exposition() + await backend.metrics_text()
        return Response(text, media_type="text/plain; version=0.0.4")

    return app
