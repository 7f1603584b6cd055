"""Errors the serving side raises on purpose (members of the one `AdapterError` family).

Each names what was wrong in words a client can act on; the HTTP edge maps every
class to one status in `serving/api/errors.py`. None of them carries request text.
Three siblings under `AdapterError`, so a handler can tell them apart by kind:

    adapter errors   adapters/errors.py: a name, file, version or owner that is wrong
    RequestError     the request asked for something refused (400, 413)
    CapacityError    the server cannot take it now; the same request may succeed later (429, 503, 504)
"""

from __future__ import annotations

from adapters.errors import AdapterError


class RequestError(AdapterError):
    """What the request asked for is refused (4xx). `param` names the request field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class InvalidRequestError(RequestError):
    """A request field holds a value this server refuses (400)."""


class UnsupportedParameterError(InvalidRequestError):
    """An OpenAI parameter this server does not implement (400)."""


class ContextLengthError(InvalidRequestError):
    """An input does not fit the model's context (400, code context_length_exceeded)."""


class WrongTaskError(InvalidRequestError):
    """The adapter exists but serves another task than the route asked for (400)."""


class LimitError(InvalidRequestError):
    """A request over the configured size limits (413)."""


class CapacityError(AdapterError):
    """The server cannot take the request now; retried later, the same request may succeed."""


class RateLimitedError(CapacityError):
    """A tenant over its request rate, token rate or concurrency (429 + Retry-After)."""

    def __init__(self, message: str, retry_after_s: float, limit: str):
        super().__init__(message)
        self.retry_after_s, self.limit = retry_after_s, limit  # limit: requests | tokens | concurrency


class OverloadedError(CapacityError):
    """Too many requests in flight (503 + Retry-After)."""


class ShuttingDownError(CapacityError):
    """The server is draining before it stops: no new request (503 + Retry-After), and a request
    still running when the drain bound passes ends with this error."""


class RequestTimeoutError(CapacityError):
    """The model call did not finish within limits.request_timeout_s (504)."""


class ReplicaUnavailableError(CapacityError):
    """The model replica died or is restarting (503 + Retry-After)."""


class BatchFailedError(AdapterError):
    """The forward pass failed for this call alone, after its batch was split (500)."""


class BankFullError(CapacityError):
    """Every device slot is in use by requests in flight; retry shortly."""
