"""Start and stop the Serve app on this machine (what `dcft serve` and the demo use)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from backbones.loading import backbone_ref
from backbones.shipped import resolve_model_dir
from serving.api.request_ids import PROXY_CALLBACK
from serving.config import ServeConfig

logger = logging.getLogger(__name__)


class ClusterClashError(RuntimeError):
    """The app would replace or collide with what already runs on the Ray cluster."""


_started: dict[str, float] = {}  # the Serve apps this process deployed -> their drain bound
_owns_cluster = False  # whether this process started the Ray instance (then stop() ends it)


def start(apps: dict[str, ServeConfig], host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 300,
          names: dict[str, str] | None = None) -> str:
    """Start Ray locally (or join the cluster RAY_ADDRESS names) and one Serve app per route prefix;
    return the base URL.

    `apps` maps a route prefix ("/" or "/minilm") to that app's config; each app serves one
    backbone and its hub. An app is named `names[prefix]`, else after its backbone. An app whose
    name or route prefix is taken on the cluster, or a port other than the one the cluster's Serve
    proxy listens on, is refused before anything is deployed.
    """
    import ray
    from ray import serve

    from serving.deployment import build_app

    global _owns_cluster
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        _owns_cluster = not os.environ.get("RAY_ADDRESS")
        with sigterm_handler_kept():
            ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                     runtime_env={"env_vars": proxy_env()})
    configs = {prefix: _with_absolute_paths(config) for prefix, config in apps.items()}
    backbones = {prefix: backbone_ref(resolve_model_dir(c.engine.model)).name for prefix, c in configs.items()}
    named = {prefix: (names or {}).get(prefix) or backbones[prefix] for prefix in configs}
    if len(set(named.values())) < len(named):
        raise ClusterClashError(f"two apps would share a name ({named}): name them")
    check_free(serve_details(), named, port)
    serve.start(http_options={"host": host, "port": port})
    for prefix, config in configs.items():
        serve.run(build_app(config, backbones[prefix]), name=named[prefix], route_prefix=prefix)
        _started[named[prefix]] = config.limits.drain_timeout_s
    base = f"http://{host}:{port}"
    for prefix in apps:
        wait_ready(f"{base}{prefix.rstrip('/')}/readyz", timeout_s)
    check_request_ids(f"{base}{next(iter(apps)).rstrip('/')}/healthz")
    return base


@contextlib.contextmanager
def sigterm_handler_kept() -> Iterator[None]:
    """ray.init makes a driver exit on SIGTERM; a handler of the caller's own (`dcft serve` drains
    on SIGTERM) is put back."""
    kept = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if callable(kept) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, kept)


def proxy_env() -> dict[str, str]:
    """The environment Serve's HTTP proxies need (they inherit this job's, where it starts them):
    the request-id rule in front of the proxy's own (serving/api/request_ids.py)."""
    return {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK}


def check_request_ids(url: str) -> None:
    """Warn where the cluster's Serve proxy was started without our request-id rule (by a process
    other than `dcft serve`): it would answer an invalid client id in the header, another in the body."""
    invalid = "an invalid request id"
    try:
        echoed = httpx.get(url, headers={"x-request-id": invalid}, timeout=10).headers.get("x-request-id")
    except httpx.HTTPError:
        return  # a check only: the app is up and answers
    if echoed == invalid:
        logger.warning("this Ray cluster's Serve proxy echoes invalid client request ids; start the cluster "
                       "with RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=%s (see deploy/README.md)", PROXY_CALLBACK)


def serve_details() -> dict | None:
    """What Serve runs on the connected cluster (its apps with their route prefixes, its HTTP
    options), or None where Serve is not running there yet."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        controller = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
    except ValueError:
        return None
    return ray.get(controller.get_serve_instance_details.remote())


def check_free(details: dict | None, named: dict[str, str], port: int) -> None:
    """Refuse names, route prefixes and a port that clash with the cluster's running apps."""
    if not details:
        return
    running = {name: app.get("route_prefix") for name, app in (details.get("applications") or {}).items()}
    for prefix, name in named.items():
        if name in running:
            raise ClusterClashError(f"a Serve app named '{name}' already runs on this Ray cluster (route "
                                    f"{running[name]}); stop it first, or name this one with --app-name")
        taken = [other for other, other_prefix in running.items() if other_prefix == prefix]
        if taken:
            raise ClusterClashError(f"route prefix '{prefix}' is taken by the app '{taken[0]}' on this Ray "
                                    "cluster; serve this one under another --route-prefix")
    listening = (details.get("http_options") or {}).get("port")
    if listening is not None and listening != port:
        raise ClusterClashError(f"this Ray cluster's Serve proxy listens on port {listening}, and every app on "
                                f"one cluster shares it: serve on --port {listening} under its own --route-prefix")


def _with_absolute_paths(config: ServeConfig) -> ServeConfig:
    """Replicas may not share this process's working directory: pin local paths down."""
    engine = config.engine
    updates = {}
    if "://" not in engine.hub:
        updates["hub"] = str(Path(engine.hub).resolve())
    if Path(engine.model).exists():
        updates["model"] = str(Path(engine.model).resolve())
    keys = config.api_keys_file and str(Path(config.api_keys_file).resolve())
    return config.model_copy(update={"engine": engine.model_copy(update=updates), "api_keys_file": keys})


def wait_ready(url: str, timeout_s: float) -> None:
    """Poll readiness with a deadline (no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s")
        time.sleep(0.2)


DRAIN_GRACE_S = 10.0  # beyond the bound: for the requests it ended to send their last event


def drain() -> dict[str, dict[str, int]]:
    """Drain every app this process deployed, all at once: each Ingress replica stops admitting (503 +
    Retry-After), lets what runs finish within its `drain_timeout_s`, then ends what is left with an
    error event. Answers, per app, the requests its replicas ended at the bound, those still running
    after it, and the replicas that did not answer."""
    return asyncio.run(_drain_all())


async def _drain_all() -> dict[str, dict[str, int]]:
    from ray import serve

    async def drain_app(name: str) -> dict[str, int]:
        broadcast = serve.get_deployment_handle("Ingress", name).broadcast("drain")
        try:
            replies = await broadcast.results_async(timeout_s=_started[name] + DRAIN_GRACE_S, return_exceptions=True)
        except Exception:  # noqa: BLE001 - not in time, or no replica to ask: the app is stopped anyway
            logger.warning("could not drain the app '%s'", name, exc_info=True)
            return {"ended_by_bound": 0, "still_running": 0, "unanswered": 1}
        counts = [reply for reply in replies if isinstance(reply, dict)]
        outcome = {key: sum(c[key] for c in counts) for key in ("ended_by_bound", "still_running")}
        return outcome | {"unanswered": len(replies) - len(counts)}

    names = list(_started)
    return dict(zip(names, await asyncio.gather(*(drain_app(name) for name in names)), strict=True))


def stop() -> None:
    """Delete the apps this process deployed; end Serve and Ray only where this process started
    them (on a shared cluster the other apps keep running)."""
    import ray
    from ray import serve

    global _owns_cluster
    if _owns_cluster:
        serve.shutdown()
    else:
        for name in _started:
            serve.delete(name)
    _started.clear()
    _owns_cluster = False
    ray.shutdown()
