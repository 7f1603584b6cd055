"""What every route shares: the backend, keys, limits, admission and the hub listing,
plus the checks each request passes before it may reach a model replica."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, TypeVar

from fastapi import Depends, Header, Request

from adapters.errors import AccessDeniedError, AdapterNotFoundError
from adapters.store.hub import AdapterHub, AdapterVersion
from adapters.store.names import AdapterRef
from serving.api.admission import Admission
from serving.api.auth import PUBLIC_TENANT, Caller, KeyRing
from serving.api.drain import Drain
from serving.calls import Backend
from serving.config import LimitsConfig
from serving.errors import InvalidRequestError, LimitError, RequestTimeoutError
from serving.metrics import RequestMetrics

if TYPE_CHECKING:
    from serving.api.fine_tuning import FineTuning

T = TypeVar("T")


@dataclass
class Edge:
    backend: Backend
    keys: KeyRing
    limits: LimitsConfig
    hub: AdapterHub
    backbone_name: str
    metrics: RequestMetrics
    admission: Admission
    drain: Drain
    converge_timeout_s: float = 15.0  # how long admin changes wait for every replica to apply them
    started: int = field(default_factory=lambda: int(time.time()))  # the backbone's model card's `created`
    fine_tuning: FineTuning | None = None  # the files and fine-tuning routes' store and limits; None: off

    async def within_timeout(self, call: Awaitable[T], timeout_s: float | None = None) -> T:
        """`call`'s answer, or 504 after `timeout_s` (default: limits.request_timeout_s), or 503 once
        a drain's bound passed."""
        timeout_s = self.limits.request_timeout_s if timeout_s is None else timeout_s
        try:
            return await self.drain.first(call, timeout_s)
        except TimeoutError:
            raise RequestTimeoutError(f"the model did not answer within {timeout_s:g} s") from None

    def adapter_ref(self, ref: str, backbone_serves: bool = True) -> AdapterRef:
        """A request's `TENANT/TASK[@N]`, parsed here once: from here on the parsed ref travels.
        A bare word names no adapter: 404, as OpenAI answers an unknown model; a malformed name
        is a 400 naming what is wrong. backbone_serves: whether the route could serve the bare
        backbone instead (not classify: the backbone has no task head)."""
        if ref == self.backbone_name and not backbone_serves:
            raise InvalidRequestError(f"'{ref}' is the backbone, which has no task head; name an adapter "
                                      "TENANT/TASK", "adapter")
        if "/" not in ref:
            instead = f"use '{self.backbone_name}' or an adapter TENANT/TASK" if backbone_serves else \
                "name an adapter TENANT/TASK"
            raise AdapterNotFoundError(f"model '{ref}' does not exist; {instead}")
        return AdapterRef.parse(ref)

    def check_inputs(self, count: int, texts: list[str]) -> None:
        if count > self.limits.max_inputs_per_request:
            raise LimitError(f"{count} inputs in one request; the limit is {self.limits.max_inputs_per_request}")
        longest = max((len(t) for t in texts), default=0)
        if longest > self.limits.max_input_chars:
            raise LimitError(f"an input has {longest} characters; the limit is {self.limits.max_input_chars}")

    def check_new_tokens(self, new_tokens: int) -> None:
        if new_tokens > self.limits.max_new_tokens:
            raise InvalidRequestError(
                f"max_tokens is {new_tokens}; the limit is {self.limits.max_new_tokens}", "max_tokens"
            )

    def check_choices(self, choices: int) -> None:
        if choices > self.limits.max_choices:
            raise InvalidRequestError(
                f"{choices} choices in one request (prompts x n); the limit is {self.limits.max_choices}", "n"
            )

    def visible(self, who: Caller) -> list[AdapterVersion]:
        if who.is_admin:
            return self.hub.list()
        mine = self.hub.list(tenant=who.tenant)
        return mine + (self.hub.list(tenant=PUBLIC_TENANT) if who.tenant != PUBLIC_TENANT else [])


def edge_of(request: Request) -> Edge:
    return request.app.state.edge


def caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    who = edge_of(request).keys.authenticate(authorization)
    request.state.tenant = who.tenant  # for the refusal log line
    return who


def admin(who: Annotated[Caller, Depends(caller)]) -> Caller:
    if not who.is_admin:
        raise AccessDeniedError(f"tenant '{who.tenant}' is not an admin")
    return who


AnyCaller = Annotated[Caller, Depends(caller)]
AdminCaller = Annotated[Caller, Depends(admin)]
EdgeState = Annotated[Edge, Depends(edge_of)]
