"""One request id end to end: the `x-request-id` header, the error body's `request_id` and the logs.

A client's own `x-request-id` is kept when it is one header of printable ASCII without spaces, up
to 128 characters (UUIDs, OpenTelemetry and cloud trace ids); any other is replaced by a fresh id.

Under Ray Serve the rule runs twice with the same outcome. Serve's HTTP proxy answers with the
`x-request-id` it passed on, whatever the replica sends, so `proxy_middlewares` puts the rule in
front of the proxy's own (`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, set by `serving/launch.py`):
the proxy then passes on, and answers with, a valid id only, which the edge keeps.
"""

from __future__ import annotations

import re
import uuid

HEADER = b"x-request-id"
CLIENT_ID = re.compile(rb"[\x21-\x7e]{1,128}")
PROXY_CALLBACK = "serving.api.request_ids:proxy_middlewares"  # the proxy imports it by this path


def fresh_request_id() -> str:
    return f"req-{uuid.uuid4().hex[:20]}"


def client_request_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The client's own id, where it sent exactly one valid `x-request-id`."""
    given = [value for name, value in headers if name.lower() == HEADER]
    return given[0].decode() if len(given) == 1 and CLIENT_ID.fullmatch(given[0]) else None


def with_valid_request_id(scope: dict) -> dict:
    """`scope` where its headers hold one valid `x-request-id`: the client's, else a fresh one."""
    headers = scope.get("headers") or []
    if client_request_id(headers) is not None:
        return scope
    kept = [(name, value) for name, value in headers if name.lower() != HEADER]
    return {**scope, "headers": [*kept, (HEADER, fresh_request_id().encode())]}


class ProxyRequestIds:
    """ASGI middleware for Serve's HTTP proxy: an invalid client id is replaced before the proxy
    reads it, so the id the proxy answers with is the one the edge uses."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            scope = with_valid_request_id(scope)
        await self.app(scope, receive, send)


def proxy_middlewares() -> list:
    """What Serve's proxy calls at start when RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH names it."""
    from starlette.middleware import Middleware

    return [Middleware(ProxyRequestIds)]
