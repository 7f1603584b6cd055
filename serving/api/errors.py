"""One error contract for every route, in OpenAI's shape:

    {"error": {"message", "type", "param", "code", "request_id"}}

Each of our exception classes maps to one status, type and code in `RULES` (most
specific first). Messages are ours and never echo the request; anything we did not
raise on purpose answers 500 with only the request id, and the traceback goes to the
server log under that id. Errors that crossed Ray arrive unwrapped (`RayBackend` in
`serving/ingress.py`), so no Ray traceback, host or pid reaches a client.
"""

from __future__ import annotations

import functools
import logging
import re

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from adapters.errors import (
    AccessDeniedError,
    AdapterError,
    AdapterFileError,
    AdapterNotFoundError,
    BaseModelMismatchError,
    RecordNotFoundError,
    RegistryError,
    RegistryUnavailableError,
    TrainingFileError,
)
from serving.api.auth import UnauthenticatedError
from serving.api.schemas import ErrorBody
from serving.errors import (
    BankFullError,
    BatchFailedError,
    ContextLengthError,
    InvalidRequestError,
    LimitError,
    OverloadedError,
    RateLimitedError,
    ReplicaUnavailableError,
    RequestTimeoutError,
    ShuttingDownError,
    UnsupportedParameterError,
    WrongTaskError,
)

logger = logging.getLogger(__name__)

INVALID, SERVER = "invalid_request_error", "server_error"
FIELD = re.compile(r"[a-z_][a-z0-9_]*|\d+")
TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict", "none"}

RULES: list[tuple[type[Exception], int, str, str | None]] = [
    (UnauthenticatedError, 401, "authentication_error", "invalid_api_key"),
    (AccessDeniedError, 403, "permission_error", "permission_denied"),
    (RecordNotFoundError, 404, "not_found_error", "not_found"),
    (AdapterNotFoundError, 404, "not_found_error", "model_not_found"),
    (LimitError, 413, INVALID, "request_too_large"),
    (RateLimitedError, 429, "rate_limit_error", "rate_limit_exceeded"),
    (ContextLengthError, 400, INVALID, "context_length_exceeded"),
    (UnsupportedParameterError, 400, INVALID, "unsupported_parameter"),
    (WrongTaskError, 400, INVALID, "wrong_task"),
    (BankFullError, 503, SERVER, "overloaded"),
    (OverloadedError, 503, SERVER, "overloaded"),
    (RegistryUnavailableError, 503, SERVER, "registry_unavailable"),
    (ReplicaUnavailableError, 503, SERVER, "replica_unavailable"),
    (ShuttingDownError, 503, SERVER, "shutting_down"),
    (RequestTimeoutError, 504, SERVER, "timeout"),
    (BatchFailedError, 500, SERVER, "internal_error"),
    (BaseModelMismatchError, 422, INVALID, "invalid_adapter"),
    (AdapterFileError, 422, INVALID, "invalid_adapter"),
    (RegistryError, 400, INVALID, "invalid_name"),
    (InvalidRequestError, 400, INVALID, "invalid_value"),
    (TrainingFileError, 400, INVALID, "invalid_file"),
    (AdapterError, 400, INVALID, None),
]
# Errors about the adapter a request named: their `param` is the field that named it.
ABOUT_THE_ADAPTER = (AdapterNotFoundError, AccessDeniedError, WrongTaskError, RegistryError, AdapterFileError,
                     BaseModelMismatchError)


def naming(param: str):
    """A route decorator: inside the route, an error about the adapter or record the request named
    gets `param`, the request field that named it (OpenAI's `param`), unless it carries one already."""

    def decorate(route):
        @functools.wraps(route)  # FastAPI reads the route's own signature through __wrapped__
        async def named(*args, **kwargs):
            try:
                return await route(*args, **kwargs)
            except ABOUT_THE_ADAPTER as err:
                if getattr(err, "param", None) is None:
                    err.param = param
                raise

        return named

    return decorate


def rule_for(err: Exception) -> tuple[int, str, str | None]:
    for cls, status, kind, code in RULES:
        if isinstance(err, cls):
            return status, kind, code
    return 500, SERVER, "internal_error"


def status_for(err: Exception) -> int:
    return rule_for(err)[0]


def error_object(message: str, kind: str, param: str | None = None, code: str | None = None,
                 request_id: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code, "request_id": request_id}}


def error_json(status: int, message: str, kind: str, *, param: str | None = None, code: str | None = None,
               request_id: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = error_object(message, kind, param, code, request_id)
    return JSONResponse(body, status_code=status, headers=headers)  # x-request-id: middleware


def error_body(err: Exception, request_id: str | None = None) -> dict:
    """The error object for one of our exceptions (a stream sends it as its last event)."""
    status, kind, code = rule_for(err)
    if status >= 500 and not isinstance(err, AdapterError):
        message = f"internal error; quote request id {request_id} when reporting it"
    else:
        message = str(err) or kind
    param = getattr(err, "param", None)
    return error_object(message, kind, param, code, request_id)


def error_response(err: Exception, request_id: str | None) -> JSONResponse:
    status = status_for(err)
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if isinstance(err, RateLimitedError):
        headers["Retry-After"] = str(max(1, round(err.retry_after_s + 0.5)))
    elif status in (503, 504):
        headers["Retry-After"] = "1"
    return JSONResponse(error_body(err, request_id), status_code=status, headers=headers)


def request_id_of(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


async def on_adapter_error(request: Request, err: AdapterError) -> JSONResponse:
    """One of our errors: a refusal (4xx) logs one INFO line, an overload or timeout (503/504) one
    WARNING line, and a failure (500) one ERROR line, each without a traceback: the fault behind a
    500 was logged with its traceback where it was caught."""
    status, _, code = rule_for(err)
    level = logging.INFO if status < 500 else logging.WARNING if status in (503, 504) else logging.ERROR
    logger.log(level, "request %s: %d %s tenant=%s route=%s %s", request_id_of(request), status, code,
               getattr(request.state, "tenant", "-"), request.url.path, type(err).__name__)
    return error_response(err, request_id_of(request))


async def on_unexpected_error(request: Request, err: Exception) -> JSONResponse:
    """Runs outside every middleware (Starlette's last resort), so it sets the id header itself."""
    logger.error("request %s failed", request_id_of(request), exc_info=err)
    response = error_response(err, request_id_of(request))
    if request.app.state.echo_request_id and request_id_of(request):
        response.headers["x-request-id"] = request_id_of(request)
    return response


async def on_http_error(request: Request, err: HTTPException) -> JSONResponse:
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error"}.get(err.status_code, INVALID)
    message = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed here"}.get(
        err.status_code, str(err.detail)
    )
    return error_json(err.status_code, message, kind, request_id=request_id_of(request),
                      headers=getattr(err, "headers", None))


async def on_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    """400 naming the parameter; pydantic's `input` (the request itself) is never echoed."""
    # A union reports each member's mismatch; the member that nearly fit says more.
    content_type = request.headers.get("content-type", "")
    if content_type and "json" not in content_type.lower():
        logger.info("request %s: 415 content type %.40s", request_id_of(request), content_type)
        return error_json(415, "send the request body as JSON (Content-Type: application/json)", INVALID,
                          code="unsupported_media_type", request_id=request_id_of(request))
    problems = sorted(err.errors(), key=lambda problem: problem.get("type", "").endswith("_type"))
    first = problems[0] if problems else {"type": "invalid", "loc": (), "msg": "invalid request"}
    param, message, code = describe(first)
    if len(problems) > 1:
        message += f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''})"
    logger.info("request %s: 400 %s tenant=%s route=%s param=%s", request_id_of(request), code,
                getattr(request.state, "tenant", "-"), request.url.path, param)
    return error_json(400, message, INVALID, param=param, code=code, request_id=request_id_of(request))


def describe(problem: dict) -> tuple[str | None, str, str]:
    """(param, message, code) for one pydantic error, without the offending value."""
    loc = [str(part) for part in problem.get("loc", ()) if part not in ("body", "query", "path", "header")]
    # Unions add their member types to the location (`inputs.0.TextPair.text`): keep field names only.
    param = ".".join(part for part in loc if FIELD.fullmatch(part) and part not in TYPE_NAMES) or None
    kind = problem.get("type", "")
    if kind == "unsupported_parameter":
        name = problem.get("ctx", {}).get("name")
        return name, f"parameter '{name}' is not supported by this server", "unsupported_parameter"
    if kind == "unsupported_content":
        return f"{param}.content" if param else "content", problem.get("msg", "unsupported content"), \
            "unsupported_parameter"
    if kind == "json_invalid":
        return None, "the request body is not valid JSON", "invalid_json"
    if kind == "extra_forbidden":
        return param, f"unknown parameter '{param}'", "unknown_parameter"
    if kind == "missing":
        if param is None:
            return None, "a JSON object is required as the request body", "missing_body"
        return param, f"'{param}' is required", "missing_parameter"
    message = problem.get("msg", "invalid value")
    return param, f"{param}: {message}" if param else message, "invalid_value"


ERROR_RESPONSES: dict[int | str, dict] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in [
        (400, "Invalid request: the message names the parameter"),
        (401, "Missing or unknown API key"),
        (403, "The caller may not use or manage that adapter"),
        (404, "No such model or adapter"),
        (413, "Request over the size limits"),
        (415, "The body is not JSON"),
        (429, "Over the tenant's quota; see Retry-After"),
        (503, "Overloaded, restarting or shutting down; see Retry-After"),
        (504, "The model did not answer in time"),
    ]
}
