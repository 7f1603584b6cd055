"""A real multi-node Ray cluster on this machine, with the Serve app on it.

Every node is its own raylet on 127.0.0.1 (Ray's `cluster_utils.Cluster`): a head that
holds no CPUs, only the controller, the one HTTP proxy and the Ingress (kept there by a
custom resource only the head has), and worker nodes of one CPU each, so that model
replicas asking one CPU land one per worker. A node can be removed (its raylet and its
workers killed) to see what a lost machine does to the traffic.

    with LocalCluster(workers=3) as cluster:
        base = cluster.serve({"/": config}, port=8000)
        node = cluster.replica_nodes("default")[some_replica]
        cluster.remove_node(node)

The head's dashboard runs (Ray's state API, `ray.util.state`, is served by it), and its
health checks are quick so a lost node is declared dead within seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field

from serving.config import ServeConfig

HOST = "127.0.0.1"
HEAD_RESOURCE = "head"
# Keeps each Ingress replica on the head, next to the one proxy (many may share it).
INGRESS_ON_HEAD = {HEAD_RESOURCE: 0.001}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@dataclass
class LocalCluster:
    """A head node (no CPUs, `{"head": 1}`) and `workers` worker nodes of `worker_cpus` each."""

    workers: int = 3
    worker_cpus: float = 1
    head_cpus: float = 0
    object_store_mib: int = 100
    health_check_period_ms: int = 500  # with the threshold below: a lost node is dead after about 2 s
    health_check_failure_threshold: int = 4
    _cluster: object = field(default=None, init=False, repr=False)

    def start(self) -> LocalCluster:
        import ray
        from ray.cluster_utils import Cluster

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local, throwaway cluster
        store = self.object_store_mib * 1024 * 1024
        self._cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": self.head_cpus, "resources": {HEAD_RESOURCE: 1}, "object_store_memory": store,
                "include_dashboard": True, "dashboard_host": HOST, "dashboard_port": free_port(),
                "dashboard_agent_listen_port": free_port(),
                "_system_config": {
                    "health_check_initial_delay_ms": 0,
                    "health_check_period_ms": self.health_check_period_ms,
                    "health_check_timeout_ms": self.health_check_period_ms,
                    "health_check_failure_threshold": self.health_check_failure_threshold,
                },
            },
        )
        try:
            for _ in range(self.workers):
                self.add_worker()
            self._cluster.wait_for_nodes()
            from serving.launch import proxy_env  # the request-id rule in the proxy, as `dcft serve` has it

            ray.init(address=self.address, logging_level=logging.WARNING, log_to_driver=False,
                     runtime_env={"env_vars": proxy_env()})
        except BaseException:
            self.shutdown()
            raise
        return self

    def add_worker(self) -> str:
        """A new worker node; its node id."""
        store = self.object_store_mib * 1024 * 1024
        return self._cluster.add_node(num_cpus=self.worker_cpus, object_store_memory=store).node_id

    def serve(self, apps: dict[str, ServeConfig], port: int, timeout_s: float = 240) -> str:
        """Serve one app per route prefix through the head's proxy; the base URL once all are ready.
        Each config's paths must be absolute (replicas run elsewhere), its Ingress is kept on the head."""
        from ray import serve

        from backbones.loading import backbone_ref
        from backbones.shipped import resolve_model_dir
        from serving.deployment import build_app
        from serving.launch import wait_ready

        # One proxy, on the head: every proxy on this one host would want the same port.
        serve.start(proxy_location="HeadOnly", http_options={"host": HOST, "port": port})
        for prefix, config in apps.items():
            config = config.model_copy(update={"ingress_resources": config.ingress_resources or INGRESS_ON_HEAD})
            name = backbone_ref(resolve_model_dir(config.engine.model)).name
            serve.run(build_app(config, name), name=app_name(prefix), route_prefix=prefix)
        base = f"http://{HOST}:{port}"
        for prefix in apps:
            wait_ready(f"{base}{prefix.rstrip('/')}/readyz", timeout_s)
        return base

    @property
    def head_node_id(self) -> str:
        return self._cluster.head_node.node_id

    def worker_node_ids(self) -> list[str]:
        return [node.node_id for node in self._cluster.worker_nodes]

    @staticmethod
    def live_node_ids() -> set[str]:
        import ray

        return {node["NodeID"] for node in ray.nodes() if node["Alive"]}

    @property
    def address(self) -> str:
        """The cluster's address (its GCS), for `ray.init` and Ray's state API."""
        return self._cluster.address

    def replica_nodes(self, app: str, deployment: str = "AdapterModel") -> dict[str, str]:
        """{actor id: node id} of the deployment's live replicas, from Ray's state API."""
        from ray.util.state import list_actors

        actors = list_actors(address=self.address, filters=[
            ("class_name", "=", f"ServeReplica:{app}:{deployment}"), ("state", "=", "ALIVE"),
        ], raise_on_missing_output=False)
        return {actor.actor_id: actor.node_id for actor in actors}

    def remove_node(self, node_id: str, graceful: bool = False) -> float:
        """Kill a worker node's raylet and everything on it (not graceful: as a lost machine,
        the cluster learns of it from missed health checks); the seconds until Ray calls it dead."""
        node = next(n for n in self._cluster.worker_nodes if n.node_id == node_id)
        started = time.monotonic()
        self._cluster.remove_node(node, allow_graceful=graceful)
        deadline = started + 60
        while node_id in self.live_node_ids():
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node_id} still alive 60 s after it was removed")
            time.sleep(0.1)
        return time.monotonic() - started

    def shutdown(self) -> None:
        import ray
        from ray import serve

        if self._cluster is None:
            return
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            self._cluster.shutdown()
            self._cluster = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.shutdown()


def app_name(prefix: str) -> str:
    """Serve's application name for a route prefix (as `serving.launch` names them)."""
    return prefix.strip("/") or "default"
