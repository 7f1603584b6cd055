"""Start and stop the Serve app on this machine (what `dcft serve` and the demo use)."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import httpx

from backbones.loading import backbone_ref
from backbones.shipped import resolve_model_dir
from serving.config import ServeConfig


def start(apps: dict[str, ServeConfig], host: str = "127.0.0.1", port: int = 8000, timeout_s: float = 300) -> str:
    """Start Ray locally (if needed) and one Serve app per route prefix; return the base URL.

    `apps` maps a route prefix ("/" or "/minilm") to that app's config; each app
    serves one backbone and its hub.
    """
    import ray
    from ray import serve

    from serving.deployment import build_app

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    serve.start(http_options={"host": host, "port": port})
    for prefix, config in apps.items():
        config = _with_absolute_paths(config)
        name = backbone_ref(resolve_model_dir(config.engine.model)).name
        serve.run(build_app(config, name), name=prefix.strip("/") or "default", route_prefix=prefix)
    base = f"http://{host}:{port}"
    for prefix in apps:
        wait_ready(f"{base}{prefix.rstrip('/')}/readyz", timeout_s)
    return base


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


def stop() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
