"""The HTTP edge in-process (FastAPI TestClient over the real engine, no Ray):
authentication, tenant isolation, limits and error mapping."""

import asyncio

import pytest
from fastapi.testclient import TestClient

from adapters.registry import AdapterHub
from serving.app import create_app
from serving.auth import KeyRing
from serving.backend import LocalBackend
from serving.config import EngineConfig, LimitsConfig
from serving.service import ModelService
from tests.factories import random_adapter, tiny_bert_dir, tiny_llama_dir

KEYS = {
    "acme-key-0123456789abcdef": "acme",
    "globex-key-0123456789abcd": "globex",
    "admin-key-0123456789abcdef": "admin",
}
ACME, GLOBEX, ADMIN = ({"Authorization": f"Bearer {k}"} for k in KEYS)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    bert = tiny_bert_dir(root / "bert")
    hub = AdapterHub(str(root / "hub"))
    hub.publish(random_adapter(bert, root / "a", "seq_cls", seed=1, kernel=4), "acme/sentiment")
    hub.publish(random_adapter(bert, root / "b", "seq_cls", seed=2, kernel=4), "globex/sentiment")
    hub.publish(random_adapter(bert, root / "c", "regression", seed=3, kernel=4), "public/score")
    service = ModelService(EngineConfig(model=str(bert), hub=hub.url, kernel_size=4))
    limits = LimitsConfig(max_inputs_per_request=4, max_input_chars=100, max_body_bytes=10_000)
    app = create_app(LocalBackend(service), KeyRing(KEYS), limits, hub, "bert")
    with TestClient(app) as test_client:
        yield test_client


def classify(client, adapter, headers=ACME, inputs=("fine",)):
    return client.post("/v1/classify", json={"adapter": adapter, "inputs": list(inputs)}, headers=headers)


def test_classify_own_and_public(client):
    mixed = classify(client, "acme/sentiment", inputs=["fine", {"text": "a plot", "text_pair": "a twist"}])
    assert mixed.status_code == 200 and len(mixed.json()["results"]) == 2
    alone = classify(client, "acme/sentiment", inputs=[{"text": "a plot", "text_pair": "a twist"}]).json()
    assert alone["results"][0]["scores"] == pytest.approx(mixed.json()["results"][1]["scores"], rel=1e-5)
    assert classify(client, "public/score", GLOBEX).json()["task_type"] == "regression"


def test_unauthenticated_and_cross_tenant(client):
    assert classify(client, "acme/sentiment", {}).status_code == 401
    assert classify(client, "acme/sentiment", {"Authorization": "Bearer x" * 3}).status_code == 401
    denied = classify(client, "acme/sentiment", GLOBEX)
    assert denied.status_code == 403 and "globex" in denied.json()["error"]["message"]
    for action in ("load", "unload", "reload"):
        assert client.post(f"/v1/adapters/acme/sentiment/{action}", headers=GLOBEX).status_code == 403


def test_listing_hides_other_tenants(client):
    ids = {m["id"] for m in client.get("/v1/models", headers=GLOBEX).json()["data"]}
    assert ids == {"bert", "globex/sentiment", "public/score"}
    names = {a["name"] for a in client.get("/v1/adapters", headers=ADMIN).json()["adapters"]}
    assert {"acme/sentiment", "globex/sentiment"} <= names


def test_metrics_are_admin_only_and_bounded(client):
    assert client.get("/metrics", headers=ACME).status_code == 403
    text = client.get("/metrics", headers=ADMIN).text
    assert "dcft_requests_total" in text and "acme-key" not in text and "fine" not in text


@pytest.mark.parametrize(
    "body,status",
    [
        ({"adapter": "acme/sentiment", "inputs": ["x"] * 5}, 413),
        ({"adapter": "acme/sentiment", "inputs": ["x" * 101]}, 413),
        ({"adapter": "acme/missing", "inputs": ["x"]}, 404),
        ({"adapter": "/etc/passwd", "inputs": ["x"]}, 400),
        ({"adapter": "acme/sentiment", "inputs": []}, 422),
        ({"adapter": "acme/sentiment", "inputs": ["x"], "extra": 1}, 422),
    ],
)
def test_bad_bodies(client, body, status):
    assert client.post("/v1/classify", json=body, headers=ACME).status_code == status


def test_oversized_body_is_refused_before_parsing(client):
    r = client.post(
        "/v1/classify", content=b"{" + b" " * 20_000 + b"}", headers={**ACME, "content-type": "application/json"}
    )
    assert r.status_code == 413


def test_completions_on_an_encoder_is_a_client_error(client):
    r = client.post("/v1/completions", json={"model": "acme/sentiment", "prompt": "x"}, headers=ACME)
    assert r.status_code == 400


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["backbone"] == "bert"


class SlowBackend(LocalBackend):
    """The real backend, answering only after `delay_s` (a model call that overruns)."""

    def __init__(self, service: ModelService, delay_s: float):
        super().__init__(service)
        self.delay_s = delay_s

    async def classify(self, call):
        await asyncio.sleep(self.delay_s)
        return await super().classify(call)


def test_a_model_call_over_the_timeout_answers_504(tmp_path):
    bert = tiny_bert_dir(tmp_path / "bert")
    hub = AdapterHub(str(tmp_path / "hub"))
    hub.publish(random_adapter(bert, tmp_path / "a", "seq_cls", seed=1, kernel=4), "acme/sentiment")
    service = ModelService(EngineConfig(model=str(bert), hub=hub.url, kernel_size=4))
    backend = SlowBackend(service, delay_s=2.0)
    app = create_app(backend, KeyRing(KEYS), LimitsConfig(request_timeout_s=0.2), hub, "bert")
    with TestClient(app) as slow_client:
        answer = classify(slow_client, "acme/sentiment")
        assert answer.status_code == 504 and "0.2 s" in answer.json()["error"]["message"]
        backend.delay_s = 0.0
        assert classify(slow_client, "acme/sentiment").status_code == 200


def test_max_tokens_is_capped_per_request(tmp_path):
    llama = tiny_llama_dir(tmp_path / "llama")
    hub = AdapterHub(str(tmp_path / "hub"))
    service = ModelService(EngineConfig(model=str(llama), hub=hub.url, kernel_size=4))
    app = create_app(LocalBackend(service), KeyRing(KEYS), LimitsConfig(max_new_tokens=3), hub, "llama")
    with TestClient(app) as llama_client:
        body = {"model": "llama", "prompt": "once upon", "temperature": 0}
        over = llama_client.post("/v1/completions", json=body | {"max_tokens": 4}, headers=ACME)
        assert over.status_code == 400 and "limit is 3" in over.json()["error"]["message"]
        within = llama_client.post("/v1/completions", json=body | {"max_tokens": 3}, headers=ACME)
        assert within.status_code == 200 and within.json()["usage"]["completion_tokens"] <= 3
