"""The baseline a Ray Serve user would build without dcft-hub: Ray's model multiplexing.

Each adapter becomes its own model: the backbone with that adapter merged into its
weights (a full copy, ~90 MB for MiniLM). One replica keeps up to K of them in
Serve's per-replica LRU (`@serve.multiplexed`); the ingress routes each request by
its adapter with `multiplexed_model_id`, and `@serve.batch` batches requests, which
Serve splits per model id (docs/architecture.md, "Why the engine batches across adapters").
So under uniform traffic over N > K adapters most batches hold one or two rows and most
requests wait for a model load.

Same HTTP body as our app: POST /v1/classify {"adapter": "tenant/task", "inputs": [...]}.
Used by `benchmarks.serving`; no auth, no limits (a bare baseline, not a product).
"""

# No `from __future__ import annotations`: FastAPI must see the real body type on the
# class-based ingress, or it reads `body` as a query parameter (422).

import asyncio
from dataclasses import dataclass
from pathlib import Path

import torch
from fastapi import FastAPI
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle
from transformers import PreTrainedModel

from adapters.injection import merge_adapter
from adapters.store.files import read_adapter_config
from adapters.store.hub import AdapterHub
from adapters.store.loading import load_adapter
from backbones.loading import load_backbone, load_tokenizer, pick_device

MAX_INPUT_TOKENS = 512  # MiniLM's own context, which our app's EngineConfig uses by default


@dataclass(frozen=True)
class MergedModel:
    """One adapter's own model: backbone + merged DCFT update + that adapter's head."""

    model: PreTrainedModel
    labels: list[str]


def build_merged_model(model_dir: str | Path, adapter_dir: Path, device: torch.device) -> MergedModel:
    """Backbone from disk, the adapter injected and checked, then merged (W + dW) for speed."""
    config = read_adapter_config(adapter_dir)
    model = load_backbone(model_dir, config.task_type, len(config.labels) or None, device)
    load_adapter(model, adapter_dir)
    merge_adapter(model)
    return MergedModel(model.eval(), list(config.labels))


@serve.deployment(name="MultiplexModel")
class MultiplexModel:
    def __init__(self, model_dir: str, hub_url: str, models_per_replica: int, max_batch_size: int,
                 batch_wait_timeout_s: float):
        self.model_dir, self.hub = model_dir, AdapterHub(hub_url)
        self.device = pick_device()
        self.tokenizer = load_tokenizer(model_dir)

        async def load(adapter: str) -> MergedModel:
            return await asyncio.to_thread(self._build, adapter)

        # K comes from the constructor, so the loader is wrapped here rather than decorated
        # on the class (Serve detects multiplexed functions stored on the instance too).
        self.get_model = serve.multiplexed(max_num_models_per_replica=models_per_replica)(load)
        self._classify_batch.set_max_batch_size(max_batch_size)
        self._classify_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _build(self, adapter: str) -> MergedModel:
        return build_merged_model(self.model_dir, self.hub.fetch(adapter), self.device)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _classify_batch(self, calls: list[list[str]]) -> list[list[dict]]:
        adapter = serve.get_multiplexed_model_id()  # one id per batch: Serve splits batches by it
        merged = await self.get_model(adapter)
        return await asyncio.to_thread(self._predict, merged, calls)

    @torch.inference_mode()
    def _predict(self, merged: MergedModel, calls: list[list[str]]) -> list[list[dict]]:
        texts = [text for call in calls for text in call]
        encoded = self.tokenizer(texts, truncation=True, max_length=MAX_INPUT_TOKENS, padding=True,
                                 return_tensors="pt").to(self.device)
        probs = iter(merged.model(**encoded).logits.float().softmax(-1).cpu().tolist())
        results = []
        for call in calls:
            rows = [next(probs) for _ in call]
            results.append([{"label": merged.labels[max(range(len(p)), key=p.__getitem__)],
                             "scores": dict(zip(merged.labels, p, strict=True))} for p in rows])
        return results

    async def classify(self, inputs: list[str]) -> list[dict]:
        return await self._classify_batch(inputs)


class ClassifyBody(BaseModel):
    adapter: str = Field(min_length=3, max_length=200)
    inputs: list[str] = Field(min_length=1, max_length=64)


api = FastAPI(title="ray-multiplex baseline")


@serve.deployment(name="MultiplexIngress")
@serve.ingress(api)
class MultiplexIngress:
    def __init__(self, model: DeploymentHandle):
        self.model = model

    @api.post("/v1/classify")
    async def classify(self, body: ClassifyBody) -> dict:
        routed = self.model.options(multiplexed_model_id=body.adapter)
        return {"adapter": body.adapter, "results": await routed.classify.remote(body.inputs)}

    @api.get("/readyz")
    async def readyz(self) -> dict:
        return {"status": "ready"}


def build_multiplex_app(
    model_dir: str, hub_url: str, models_per_replica: int, max_batch_size: int = 32,
    batch_wait_timeout_s: float = 0.005, max_ongoing_requests: int = 512,
) -> serve.Application:
    """Ingress + one multiplexing model replica, with the same batch limits as our app."""
    model = MultiplexModel.options(
        max_ongoing_requests=max(max_ongoing_requests, max_batch_size), ray_actor_options={"num_cpus": 0}
    ).bind(model_dir, hub_url, models_per_replica, max_batch_size, batch_wait_timeout_s)
    return MultiplexIngress.options(max_ongoing_requests=max_ongoing_requests,
                                    ray_actor_options={"num_cpus": 0}).bind(model)
