"""The Ingress deployment: the FastAPI edge on Ray Serve, and its `RayBackend` to the model replicas.

Its own module, apart from `serving/deployment.py`, so an Ingress replica imports the edge and the
contract (`serving/calls.py`) only: no torch, no engine. Errors a model replica returns come back
unwrapped, so only our own message (never a Ray traceback, host or pid) can reach a client.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from adapters.errors import AdapterError
from adapters.store.hub import AdapterHub
from adapters.store.jobs import JobStore
from serving.api.admission import Admission
from serving.api.app import create_app
from serving.api.auth import KeyRing
from serving.api.fine_tuning import FineTuning
from serving.calls import ModelMethod, StreamMethod, raise_if_error
from serving.config import ServeConfig
from serving.errors import BatchFailedError, OverloadedError, ReplicaUnavailableError
from serving.fleet import ReplicaView, live_replicas
from serving.metrics import ServeIngressMetrics

logger = logging.getLogger(__name__)


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
                         metrics_mirror=ServeIngressMetrics(),  # every Ingress replica on Ray's metrics port
                         fine_tuning=fine_tuning_for(self.config))
        self.edge = app.state.edge
        threading.Thread(target=follow_ingress_replicas, args=(self.edge.admission, app_name), daemon=True).start()
        return app

    async def drain(self) -> dict[str, int]:
        """Stop admitting (503 + Retry-After), let what runs finish within limits.drain_timeout_s, then
        end what is left with an error; `dcft serve` broadcasts it to every Ingress replica on SIGTERM."""
        return await self.edge.drain.drain()


def fine_tuning_for(config: ServeConfig) -> FineTuning | None:
    """The fine-tuning routes' state: jobs in the hub's own store, for the adapters these replicas can mix."""
    if config.fine_tuning is None:
        return None
    engine = config.engine
    return FineTuning(JobStore(engine.hub), config.fine_tuning, engine.kernel_size, tuple(engine.targets))


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
