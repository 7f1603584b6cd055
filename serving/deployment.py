"""The Ray Serve application: the Ingress (`serving/ingress.py`) in front of the model deployment.

`AdapterModel` batches calls across adapters with `@serve.batch` (the adapter name
travels in each call: Serve's model multiplexing would split batches per adapter; see
docs/architecture.md). Replica counts, resources and batch sizes come from the config.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncIterator

import torch
from ray import serve
from ray.serve.config import RequestRouterConfig

from adapters.errors import AdapterError
from serving.calls import (
    ClassifyCall,
    ClassifyResult,
    DecodeEvent,
    GenerateCall,
    GenerateResult,
    raise_if_error,
)
from serving.config import ServeConfig
from serving.ingress import Ingress
from serving.metrics import EngineMetrics, ServeReplicaMetrics
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
                                    replica_id=serve.get_replica_context().replica_id.unique_id,
                                    batch_generate=self._generate_batch)
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
        return await self.service.complete(call)

    async def stream(self, call: GenerateCall) -> AsyncIterator[DecodeEvent | AdapterError]:
        """Streamed through a streaming handle; Serve cancels this generator when the caller
        goes away, and closing it takes the call's rows out of the running batch. An error of
        ours is the last item, a value (see above)."""
        try:
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
        # Where Serve stops an Ingress replica itself (a redeploy, `serve shutdown`), it waits for the
        # replica's requests as long as `dcft serve` drains; after a drain it finds none, at once.
        graceful_shutdown_timeout_s=config.limits.drain_timeout_s,
        graceful_shutdown_wait_loop_s=0.2,
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
