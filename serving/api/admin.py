"""Listing, management, health and metrics routes.

Health and readiness say only whether the service answers: which tenants and adapters
it holds is for the admin (`/v1/admin/status`), and listings show a tenant only its
own and public adapters.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import Response

from adapters.store.hub import AdapterVersion
from adapters.store.names import AdapterRef
from serving.api import schemas as s
from serving.api.auth import Caller
from serving.api.edge import AdminCaller, AnyCaller, Edge, EdgeState
from serving.api.errors import ERROR_RESPONSES, naming
from serving.api.rollout import converge

router = APIRouter(responses=ERROR_RESPONSES)


@router.get("/v1/models", response_model=s.ModelList)
async def models(who: AnyCaller, edge: EdgeState):
    cards = [backbone_card(edge)] + [adapter_card(v) for v in edge.visible(who)]
    return s.ModelList(data=cards)


@router.get("/v1/models/{model:path}", response_model=s.ModelCard)
@naming("model")
async def retrieve_model(model: str, who: AnyCaller, edge: EdgeState):
    """One model card (OpenAI's `models.retrieve`): the backbone, or an adapter the caller may use
    (`TENANT/TASK` for its newest version, `TENANT/TASK@N` for that one)."""
    if model == edge.backbone_name:
        return backbone_card(edge)
    ref = edge.adapter_ref(model)
    who.check_use(ref)
    return adapter_card(await asyncio.to_thread(edge.hub.resolve, ref))


def backbone_card(edge: Edge) -> s.ModelCard:
    return s.ModelCard(id=edge.backbone_name, created=edge.started, owned_by="dcft-hub")


def adapter_card(version: AdapterVersion) -> s.ModelCard:
    return s.ModelCard(id=version.name, created=int(version.created_at.timestamp()), owned_by=version.tenant,
                       version=version.version)


@router.get("/v1/adapters")
async def list_adapters(who: AnyCaller, edge: EdgeState):
    return {"adapters": [v.model_dump(mode="json") for v in edge.visible(who)]}


# Management changes run on one replica first (so a bad adapter fails the request with its
# own error), are recorded in the registry as the fleet's desired state, and answer once
# every live replica has applied them, or with how many had after `converge_timeout_s`.


@router.post("/v1/adapters/reload")
async def reload_all(who: AdminCaller, edge: EdgeState):
    """What the registry watcher does each poll: pick up new versions of every adapter in use."""
    result = await edge.backend.call("reload", None)
    return result | {"rollout": await rollout(edge, who)}


@router.post("/v1/adapters/{tenant}/{task}/load")
@naming("path")
async def load(tenant: str, task: str, who: AnyCaller, edge: EdgeState,
               body: s.LoadRequest | None = None):
    ref, pin = managed(edge, who, tenant, task), bool(body and body.pin)
    result = await edge.backend.call("load", ref, pin)
    await asyncio.to_thread(edge.hub.fleet.set, ref, "pinned" if pin else "loaded")
    return result | {"rollout": await rollout(edge, who)}


@router.post("/v1/adapters/{tenant}/{task}/unload")
@naming("path")
async def unload(tenant: str, task: str, who: AnyCaller, edge: EdgeState):
    ref = managed(edge, who, tenant, task)
    result = await edge.backend.call("unload", ref)
    await asyncio.to_thread(edge.hub.fleet.set, ref, "unloaded")
    return result | {"rollout": await rollout(edge, who)}


@router.post("/v1/adapters/{tenant}/{task}/reload")
@naming("path")
async def reload(tenant: str, task: str, who: AnyCaller, edge: EdgeState):
    result = await edge.backend.call("reload", managed(edge, who, tenant, task).name)
    return result | {"rollout": await rollout(edge, who)}


async def rollout(edge: Edge, who: Caller) -> dict:
    """Replicas that have applied the change; which ones only for an admin."""
    return await converge(edge.backend, edge.hub, edge.converge_timeout_s, detail=who.is_admin)


def managed(edge: Edge, who, tenant: str, task: str) -> AdapterRef:
    ref = edge.adapter_ref(f"{tenant}/{task}")
    who.check_manage(ref)
    return ref


@router.get("/healthz")
async def healthz():
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(edge: EdgeState):
    """Ready when a model replica answers (503 otherwise); names nothing it holds."""
    await edge.backend.call("status")
    return {"status": "ready"}


@router.get("/v1/admin/status")
async def admin_status(who: AdminCaller, edge: EdgeState):
    """One replica's backbone, device, resident counts and adapters in use, and under
    `replicas` what every live replica last reported: its node, the registry change it
    caught up with, the adapters on its device and its bank's hits and misses."""
    status = await edge.backend.call("status")
    replicas = [{"replica": v.replica_id, "node": v.node_id, **v.stats} for v in await edge.backend.replicas()]
    return status | {"replicas": sorted(replicas, key=lambda r: r["replica"]),
                     "ingress_replicas_sharing_quotas": edge.admission.peers}


@router.get("/metrics")
async def prometheus(who: AdminCaller, edge: EdgeState):
    """The edge series of the one Ingress replica that answers, and no model replica's: the
    answer opens with a comment and `dcft_metrics_scope` saying so. Cluster-wide series
    (every Ingress and AdapterModel replica) are `ray_dcft_*` on Ray's metrics port."""
    return Response(edge.metrics.exposition(), media_type="text/plain; version=0.0.4")
