"""ASGI middleware of the HTTP edge: a request id on every answer, every response
counted by route and status (refusals included), no new request while the edge drains,
and the body size limit."""

from __future__ import annotations

import logging

from starlette.routing import Match

from serving.api.drain import Drain
from serving.api.errors import error_response
from serving.api.request_ids import HEADER, client_request_id, fresh_request_id
from serving.errors import LimitError, ShuttingDownError
from serving.metrics import RequestMetrics

logger = logging.getLogger(__name__)

CLIENT_CLOSED = 499  # nginx's label for a request whose client went away before the answer
OPEN_WHILE_DRAINING = {"/healthz", "/metrics"}  # liveness and the operators' view stay up to the end


class RequestContext:
    """Outermost: give each request an id (a client's own `x-request-id` when it is valid, see
    `request_ids.py`), return it as `x-request-id`, and count the response."""

    def __init__(self, app, metrics: RequestMetrics, echo: bool = True):
        self.app, self.metrics, self.echo = app, metrics, echo

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = client_request_id(scope.get("headers") or []) or fresh_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        status = None

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.echo:
                    headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != HEADER]
                    message = {**message, "headers": [*headers, (HEADER, request_id.encode())]}
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
    # Refused before routing: matched against the app's own routes (FastAPI wraps an included
    # router in one object without a path, so the app's route list cannot say which route).
    for route in getattr(scope["app"].state, "routes", ()) if "app" in scope else ():
        if route.matches(scope)[0] == Match.FULL:
            return route.path
    return "other"


class DrainGate:
    """While the edge drains, a new request answers 503 + Retry-After (`/readyz` too, so load
    balancers stop sending); an admitted one counts as running until its answer is out in full."""

    def __init__(self, app, drain: Drain):
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or route_path(scope) in OPEN_WHILE_DRAINING:
            return await self.app(scope, receive, send)
        if self.drain.draining:
            request_id = scope.get("state", {}).get("request_id")
            logger.info("request %s: 503 shutting_down route=%s", request_id, route_path(scope))
            err = ShuttingDownError("the server is shutting down and takes no new requests; retry shortly")
            return await error_response(err, request_id)(scope, receive, send)
        with self.drain.admitted():
            await self.app(scope, receive, send)


def route_path(scope) -> str:
    """The request's path below the app's route prefix (Serve's `root_path`)."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


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
