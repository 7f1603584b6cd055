"""ASGI middleware of the HTTP edge: a request id on every answer, every response
counted by route and status (refusals included), and the body size limit."""

from __future__ import annotations

import re
import uuid

from starlette.routing import Match

from serving.api.errors import error_response
from serving.errors import LimitError
from serving.metrics import RequestMetrics

# A client's own x-request-id is kept when it is printable ASCII without spaces, up to 128 characters
# (UUIDs, OpenTelemetry and cloud trace ids): Ray Serve's proxy echoes the client's header whatever we
# do, so a narrower rule would answer one id in the header and another in the body and the logs.
CLIENT_ID = re.compile(rb"[\x21-\x7e]{1,128}")
CLIENT_CLOSED = 499  # nginx's label for a request whose client went away before the answer


class RequestContext:
    """Outermost: give each request an id (a client's own `x-request-id` when it is a
    plain token), return it as `x-request-id`, and count the response."""

    def __init__(self, app, metrics: RequestMetrics, echo: bool = True):
        self.app, self.metrics, self.echo = app, metrics, echo

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"")
        request_id = given.decode() if CLIENT_ID.fullmatch(given) else f"req-{uuid.uuid4().hex[:20]}"
        scope.setdefault("state", {})["request_id"] = request_id
        status = None

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.echo:
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                    message = {**message, "headers": [*headers, (b"x-request-id", request_id.encode())]}
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:  # not CancelledError: the proxy cancels a request whose client hung up
            failed = True
            raise
        finally:
            self.metrics.response(route_label(scope), counted_status(scope, status, failed))


def counted_status(scope, sent: int | None, failed: bool) -> int:
    """The status a response counts as: what went out, unless a stream that began as a 200 ended
    otherwise (`outcome`: a timeout's 504, a hang-up's 499); nothing sent counts as a hang-up (499,
    nginx's "client closed request"), never a 5xx the operators are paged for, unless it failed."""
    outcome = scope.get("state", {}).get("outcome")
    if outcome is not None:
        return outcome
    if sent is not None:
        return sent
    return 500 if failed else CLIENT_CLOSED


def route_label(scope) -> str:
    """The route template a request matched ("/v1/adapters/{tenant}/{task}/load"), else "other"."""
    if "route" in scope:  # set by the router for requests that reached it
        return getattr(scope["route"], "path", "other")
    for route in scope["app"].router.routes if "app" in scope else ():  # refused before routing
        match, child = route.matches(scope)
        if match == Match.FULL:
            return getattr(child.get("route", route), "path", "other")
    return "other"


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413, declared or streamed (chunked). The body is
    read here, bounded, and handed on whole: the limit holds before any parsing. `larger` gives
    the routes (path endings, e.g. file uploads) that take bodies up to another bound."""

    def __init__(self, app, max_bytes: int, larger: dict[str, int] | None = None):
        self.app, self.max_bytes, self.larger = app, max_bytes, larger or {}

    def limit_for(self, scope) -> int:
        path = scope.get("path", "")
        return next((limit for ending, limit in self.larger.items() if path.endswith(ending)), self.max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await self._refuse(scope, receive, send, limit)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: nothing to answer
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > limit:
                return await self._refuse(scope, receive, send, limit)
        body_sent = False

        async def replay():
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # afterwards: wait for the disconnect, as the server would

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send, limit: int):
        err = LimitError(f"request body over {limit} bytes")
        await error_response(err, scope.get("state", {}).get("request_id"))(scope, receive, send)
