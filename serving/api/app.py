"""The HTTP edge (FastAPI): middleware, the error contract, and the routes, assembled."""

from __future__ import annotations

import logging

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from adapters.errors import AdapterError
from adapters.store.hub import AdapterHub
from serving.api import admin, routes
from serving.api import fine_tuning as fine_tuning_routes
from serving.api.admission import Admission
from serving.api.auth import KeyRing
from serving.api.drain import Drain
from serving.api.edge import Edge
from serving.api.errors import on_adapter_error, on_http_error, on_unexpected_error, on_validation_error
from serving.api.fine_tuning import FineTuning
from serving.api.middleware import BodyLimit, DrainGate, RequestContext
from serving.calls import Backend
from serving.config import LimitsConfig
from serving.metrics import RequestMetrics, ServeIngressMetrics

UPLOAD_OVERHEAD = 64 << 10  # a file upload's multipart framing, beyond the file's own limit


def create_app(backend: Backend, keys: KeyRing, limits: LimitsConfig, hub: AdapterHub, backbone_name: str,
               *, echo_request_id: bool = True, converge_timeout_s: float = 15.0,
               metrics_mirror: ServeIngressMetrics | None = None, fine_tuning: FineTuning | None = None) -> FastAPI:
    """`echo_request_id=False` behind a proxy that returns `x-request-id` itself (Ray Serve's
    does, with the id it passed in): the header then appears once. `metrics_mirror` (under
    Ray Serve) also records the edge's series as Ray metrics, exported from every replica.
    `fine_tuning` turns on the files and fine-tuning routes (they answer 400 without it)."""
    show_edge_logs()
    metrics = RequestMetrics(mirror=metrics_mirror)
    app = FastAPI(title="dcft-hub", version="0.1.0", description="Serve many DCFT adapters on one frozen backbone.")
    app.state.echo_request_id = echo_request_id
    drain = Drain(limits.drain_timeout_s)
    app.state.edge = Edge(backend, keys, limits, hub, backbone_name, metrics, Admission(limits, metrics), drain,
                          converge_timeout_s, fine_tuning=fine_tuning)
    uploads = fine_tuning.config.max_file_bytes + UPLOAD_OVERHEAD if fine_tuning else limits.max_body_bytes
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, larger={"/v1/files": uploads})
    app.add_middleware(DrainGate, drain=drain)
    app.add_middleware(RequestContext, metrics=metrics, echo=echo_request_id)  # added last: runs first
    app.add_exception_handler(AdapterError, on_adapter_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    app.include_router(routes.router)
    app.include_router(admin.router)
    app.include_router(fine_tuning_routes.router)
    # to label requests refused before routing
    app.state.routes = [*routes.router.routes, *admin.router.routes, *fine_tuning_routes.router.routes]
    return app


def show_edge_logs() -> None:
    """The edge's INFO lines (one per refusal) reach the log: where nothing configured logging (a
    Serve replica's root logger has no handler, so Python would print warnings and up only), the
    `serving` loggers get a stderr handler of their own, which Ray keeps in the replica's log."""
    edge = logging.getLogger("serving")
    edge.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not edge.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        edge.addHandler(handler)
