"""The Ray Serve application: a FastAPI ingress in front of a model deployment.

`AdapterModel` batches calls across adapters with `@serve.batch` (the adapter name
travels in each call: Serve's model multiplexing would split batches per adapter; see
docs/architecture.md). Replica counts, resources and batch sizes come from the config.
Errors raised in a replica come back to the ingress unwrapped from Ray's envelope, so
only our own message (never a Ray traceback, host or pid) can reach a client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator

import torch
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from adapters.errors import AdapterError
from adapters.store.hub import AdapterHub
from serving.api.admission import Admission
from serving.api.app import create_app
from serving.api.auth import KeyRing
from serving.calls import (
    ClassifyCall,
    ClassifyResult,
    DecodeEvent,
    GenerateCall,
    GenerateResult,
    ModelMethod,
    StreamMethod,
    events_of,
    raise_if_error,
)
from serving.config import ServeConfig
from serving.errors import BatchFailedError, OverloadedError, ReplicaUnavailableError
from serving.fleet import ReplicaView, live_replicas
from serving.metrics import EngineMetrics, ServeIngressMetrics, ServeReplicaMetrics
from serving.routing import ROUTER_PATH
from serving.service import ModelService

logger = logging.getLogger(__name__)


def refusals_returned(method):
    """A replica method whose errors of ours come back as values, for RayBackend to raise."""

    @functools.wraps(method)
    async def answer(self, *args):
        try:
            return await method(self, *args)
        except AdapterError as err:
            return err

    return answer


@serve.deployment(name="AdapterModel")
class AdapterModel:
    def __init__(self, config: dict):
        self.config = ServeConfig.model_validate(config)
        # Ray sets OMP_NUM_THREADS=1 for a replica asking 0 CPUs; torch would then use one core.
        torch.set_num_threads(max(1, int(self.config.replica_num_cpus) or os.cpu_count() or 1))
        metrics = EngineMetrics(mirror=ServeReplicaMetrics())  # every replica on Ray's metrics port
        self.service = ModelService(self.config.engine, self.config.watch_interval_s, metrics=metrics,
                                    replica_id=serve.get_replica_context().replica_id.unique_id)
        for method in (self._classify_batch, self._generate_batch):
            method.set_max_batch_size(self.config.max_batch_size)
            method.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _classify_batch(self, calls: list[ClassifyCall]) -> list:
        return await asyncio.to_thread(self.service.classify_many, calls)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _generate_batch(self, calls: list[GenerateCall]) -> list:
        return await asyncio.to_thread(self.service.generate_many, calls)

    # Our errors come back as values (`refusals_returned`): raised here, Serve would log every 4xx at
    # ERROR with a traceback; RayBackend raises them at the ingress, which logs each once.

    @refusals_returned
    async def classify(self, call: ClassifyCall) -> ClassifyResult:
        return raise_if_error(await self._classify_batch(call))

    @refusals_returned
    async def complete(self, call: GenerateCall) -> GenerateResult:
        if self.service.engine.decoder is not None:  # continuous batching: the decoder mixes calls
            return await self.service.complete(call)
        return raise_if_error(await self._generate_batch(call))

    async def stream(self, call: GenerateCall) -> AsyncIterator[DecodeEvent | AdapterError]:
        """Streamed through a streaming handle; Serve cancels this generator when the caller
        goes away, and closing it takes the call's rows out of the running batch. An error of
        ours is the last item, a value (see above)."""
        try:
            if self.service.engine.decoder is None:
                for event in events_of(raise_if_error(await self._generate_batch(call))):
                    yield event
                return
            async for event in self.service.stream(call):
                yield event
        except AdapterError as err:
            yield err

    @refusals_returned
    async def load(self, ref: str, pin: bool) -> dict:
        return await asyncio.to_thread(self.service.load, ref, pin)

    @refusals_returned
    async def unload(self, ref: str) -> dict:
        return await asyncio.to_thread(self.service.unload, ref)

    @refusals_returned
    async def reload(self, name: str | None) -> dict:
        return await asyncio.to_thread(self.service.reload, name)

    @refusals_returned
    async def sync(self) -> dict:
        return await asyncio.to_thread(self.service.sync)

    def record_routing_stats(self) -> dict:
        """Serve asks every `stats_period_s` and hands the answer to every router (serving/routing.py)."""
        return self.service.routing_stats()

    def status(self) -> dict:
        return self.service.status()

    def metrics_text(self) -> bytes:
        return self.service.metrics_text()

    def __del__(self):
        if hasattr(self, "service"):
            self.service.close()


class RayBackend:
    """The `Backend` protocol over a deployment handle (routed by serving/routing.py)."""

    def __init__(self, handle: DeploymentHandle, app_name: str):
        self.handle, self.app_name = handle, app_name

    async def call(self, method: ModelMethod, *args):
        with ray_errors_unwrapped():
            return raise_if_error(await getattr(self.handle, method).remote(*args))

    async def stream(self, method: StreamMethod, *args) -> AsyncIterator:
        responses = getattr(self.handle.options(stream=True), method).remote(*args)
        try:
            with ray_errors_unwrapped():
                async for item in responses:
                    yield raise_if_error(item)
        finally:
            responses.cancel()  # a caller that stops early stops the replica's generation too

    async def replicas(self) -> list[ReplicaView]:
        return live_replicas(self.app_name) or []


@contextlib.contextmanager
def ray_errors_unwrapped() -> Iterator[None]:
    try:
        yield
    except RayTaskError as err:
        raise unwrapped(err) from None
    except (RayActorError, ActorUnavailableError):
        # Serve replaces a dead replica; until then the caller gets a clean 503 to retry.
        raise ReplicaUnavailableError("the model replica is restarting; retry shortly") from None
    except BackPressureError:
        raise OverloadedError("the model replicas' queues are full; retry shortly") from None


def unwrapped(err: RayTaskError) -> AdapterError:
    """Our own error from inside Ray's envelope; anything else is logged here, in full,
    and becomes a plain 500 for the one request that met it."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, AdapterError):
        return cause
    logger.error("a model replica call failed: %s", err)
    return BatchFailedError("the model replica failed on this request")


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    def __init__(self, model: DeploymentHandle, config: dict, backbone_name: str):
        self.model, self.backbone_name = model, backbone_name
        self.config = ServeConfig.model_validate(config)

    def __serve_build_asgi_app__(self):
        keys = KeyRing.from_sources(self.config.api_keys_file, self.config.admin_tenant)
        hub = AdapterHub(self.config.engine.hub)
        app_name = serve.get_replica_context().app_name
        app = create_app(RayBackend(self.model, app_name), keys, self.config.limits, hub, self.backbone_name,
                         echo_request_id=False, converge_timeout_s=self.config.routing.converge_timeout_s,
                         metrics_mirror=ServeIngressMetrics())  # every Ingress replica on Ray's metrics port
        admission = app.state.edge.admission
        threading.Thread(target=follow_ingress_replicas, args=(admission, app_name), daemon=True).start()
        return app


PEERS_POLL_S = 10.0


def follow_ingress_replicas(admission: Admission, app_name: str) -> None:
    """Tell admission how many Ingress replicas share the quotas, from Serve's own count."""
    while True:
        try:
            states = serve.status().applications[app_name].deployments["Ingress"].replica_states
            admission.peers = sum(n for state, n in states.items() if str(state) == "RUNNING") or 1
        except Exception:  # noqa: BLE001 - a missed poll keeps the last count
            logger.debug("could not read the Ingress replica count", exc_info=True)
        time.sleep(PEERS_POLL_S)


def build_app(config: ServeConfig, backbone_name: str) -> serve.Application:
    """The application graph, with replicas and resources from the config."""
    raw = config.model_dump(mode="json")
    model = AdapterModel.options(
        **replica_count(config),
        max_ongoing_requests=max(config.max_batch_size * 2, config.limits.max_queued_requests),
        ray_actor_options={"num_cpus": config.replica_num_cpus, "num_gpus": config.replica_num_gpus},
        graceful_shutdown_timeout_s=config.limits.request_timeout_s,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_PATH,
            request_router_kwargs={"affinity": config.routing.adapter_affinity,
                                   "max_imbalance": config.routing.max_imbalance},
            request_routing_stats_period_s=config.routing.stats_period_s,
        ),
    ).bind(raw)
    ingress = Ingress.options(
        num_replicas=config.ingress_replicas,
        max_ongoing_requests=config.limits.max_queued_requests,
        ray_actor_options={"num_cpus": 0, "resources": config.ingress_resources},
    ).bind(model, raw, backbone_name)
    return ingress


def replica_count(config: ServeConfig) -> dict:
    """A fixed count, or Serve's autoscaling between the configured bounds."""
    if config.autoscaling is None:
        return {"num_replicas": config.num_replicas}
    return {"autoscaling_config": config.autoscaling.model_dump()}


def app_builder(args: dict) -> serve.Application:
    """Entry for `serve run serving.deployment:app_builder` and Serve config files."""
    from backbones.loading import backbone_ref
    from backbones.shipped import resolve_model_dir

    config = ServeConfig.model_validate(args)
    model_dir = resolve_model_dir(config.engine.model)
    return build_app(config, backbone_ref(model_dir).name)
