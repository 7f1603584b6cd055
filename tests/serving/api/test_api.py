"""The HTTP edge in-process (FastAPI TestClient over the real engine, no Ray):
authentication, tenant isolation, the error contract, limits, quotas and metrics."""

import asyncio
import json
import shutil
import subprocess
import threading
import time

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_bert_dir, tiny_llama_dir
from serving.api.app import create_app
from serving.api.auth import KeyRing
from serving.backend import LocalBackend
from serving.config import EngineConfig, LimitsConfig, TenantQuota
from serving.fleet import ReplicaView
from serving.metrics import ServeIngressMetrics
from serving.service import ModelService
from tests.ray_metrics_fakes import exported_samples, labels_key, record_ray_metrics

KEYS = {
    "acme-key-0123456789abcdef": "acme",
    "globex-key-0123456789abcd": "globex",
    "admin-key-0123456789abcdef": "admin",
}
ACME, GLOBEX, ADMIN = ({"Authorization": f"Bearer {k}"} for k in KEYS)
# Past the tiny models' 128-token context within 400 characters: a word per token for the
# BERT tokenizer, three bytes per character for the byte-level Llama one.
LONG_TEXT, LONG_PROMPT = "a " * 190, "ぁ" * 150
ERROR_FIELDS = {"message", "type", "param", "code", "request_id"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    bert, llama = tiny_bert_dir(root / "bert"), tiny_llama_dir(root / "llama")
    hub = AdapterHub(str(root / "hub"))
    hub.publish(random_adapter(bert, root / "a", "seq_cls", seed=1, kernel=4), "acme/sentiment")
    hub.publish(random_adapter(bert, root / "b", "seq_cls", seed=2, kernel=4), "globex/sentiment")
    hub.publish(random_adapter(bert, root / "c", "regression", seed=3, kernel=4), "public/score")
    lm_hub = AdapterHub(str(root / "lm-hub"))
    lm_hub.publish(random_adapter(llama, root / "d", "causal_lm", seed=4, kernel=4), "acme/writer")
    bert_service = ModelService(EngineConfig(model=str(bert), hub=hub.url, kernel_size=4))
    llama_service = ModelService(EngineConfig(model=str(llama), hub=lm_hub.url, kernel_size=4))
    return {"bert": (bert_service, hub), "llama": (llama_service, lm_hub)}


def client_for(models, name, backend=None, **limits) -> TestClient:
    service, hub = models[name]
    limits = LimitsConfig(**{"max_inputs_per_request": 4, "max_input_chars": 400, "max_body_bytes": 10_000} | limits)
    app = create_app(backend or LocalBackend(service), KeyRing(KEYS), limits, hub, name)
    return TestClient(app, raise_server_exceptions=False)  # a 500 is an answer to check, like any other


@pytest.fixture(scope="module")
def client(models):
    with client_for(models, "bert") as test_client:
        yield test_client


@pytest.fixture(scope="module")
def lm(models):
    with client_for(models, "llama", max_new_tokens=3) as test_client:
        yield test_client


def classify(client, adapter, headers=ACME, inputs=("fine",)):
    return client.post("/v1/classify", json={"adapter": adapter, "inputs": list(inputs)}, headers=headers)


def error_of(response, status: int) -> dict:
    """The error object, after checking the contract every error answer keeps."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, body
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text and "/work" not in response.text and "Ray" not in response.text
    return body["error"]


def test_classify_own_and_public(client):
    mixed = classify(client, "acme/sentiment", inputs=["fine", {"text": "a plot", "text_pair": "a twist"}])
    assert mixed.status_code == 200 and len(mixed.json()["results"]) == 2
    assert mixed.json()["usage"]["prompt_tokens"] > 2
    alone = classify(client, "acme/sentiment", inputs=[{"text": "a plot", "text_pair": "a twist"}]).json()
    assert alone["results"][0]["scores"] == pytest.approx(mixed.json()["results"][1]["scores"], rel=1e-5)
    assert classify(client, "public/score", GLOBEX).json()["task_type"] == "regression"


def test_unauthenticated_and_cross_tenant(client):
    assert error_of(classify(client, "acme/sentiment", {}), 401)["type"] == "authentication_error"
    assert error_of(classify(client, "acme/sentiment", {"Authorization": "Bearer x" * 3}), 401)["code"]
    denied = error_of(classify(client, "acme/sentiment", GLOBEX), 403)
    assert denied["type"] == "permission_error" and "globex" in denied["message"] and denied["param"] == "adapter"
    # No existence leak: another tenant's missing adapter is refused just like its real one.
    assert classify(client, "acme/nothing-here", GLOBEX).status_code == 403
    for action in ("load", "unload", "reload"):
        assert client.post(f"/v1/adapters/acme/sentiment/{action}", headers=GLOBEX).status_code == 403


def test_listing_hides_other_tenants(client):
    ids = {m["id"] for m in client.get("/v1/models", headers=GLOBEX).json()["data"]}
    assert ids == {"bert", "globex/sentiment", "public/score"}
    names = {a["name"] for a in client.get("/v1/adapters", headers=ADMIN).json()["adapters"]}
    assert {"acme/sentiment", "globex/sentiment"} <= names


@pytest.mark.parametrize(
    "body,status,param,code",
    [
        ({"adapter": "acme/sentiment", "inputs": ["x"] * 5}, 413, None, "request_too_large"),
        ({"adapter": "acme/sentiment", "inputs": ["x" * 401]}, 413, None, "request_too_large"),
        ({"adapter": "acme/missing", "inputs": ["x"]}, 404, "adapter", "model_not_found"),
        ({"adapter": "sentiment", "inputs": ["x"]}, 404, "adapter", "model_not_found"),
        ({"adapter": "/etc/passwd", "inputs": ["x"]}, 400, "adapter", "invalid_name"),
        ({"adapter": "acme/sentiment", "inputs": []}, 400, "inputs", "invalid_value"),
        ({"adapter": "acme/sentiment", "inputs": ["x"], "extra": 1}, 400, "extra", "unknown_parameter"),
        ({"adapter": "acme/sentiment"}, 400, "inputs", "missing_parameter"),
        ({"adapter": "acme/sentiment", "inputs": [LONG_TEXT]}, 400, "inputs", "context_length_exceeded"),
    ],
)
def test_bad_bodies(client, body, status, param, code):
    error = error_of(client.post("/v1/classify", json=body, headers=ACME), status)
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_context_overflow_names_the_token_counts(client):
    message = error_of(classify(client, "acme/sentiment", inputs=[LONG_TEXT]), 400)["message"]
    assert "tokens" in message and "context is 128 tokens" in message


def test_invalid_values_are_never_echoed(client):
    raw = json.dumps({"adapter": "acme/sentiment", "inputs": [{"text": "zebra" * 100, "bad": True}]})
    answer = client.post("/v1/classify", content=raw, headers={**ACME, "content-type": "application/json"})
    assert "zebra" not in answer.text and error_of(answer, 400)["param"] == "inputs.0.bad"
    nan = '{"adapter": "acme/sentiment", "inputs": ["x"], "zzz": NaN}'
    assert client.post("/v1/classify", content=nan, headers={**ACME, "content-type": "application/json"}).json()


def test_a_lone_surrogate_is_a_400_not_a_crash(client, lm):
    raw = '{"adapter": "acme/sentiment", "inputs": ["fine \\ud800"]}'
    error = error_of(client.post("/v1/classify", content=raw, headers={**ACME, "content-type": "application/json"}),
                     400)
    assert "Unicode" in error["message"] and error["param"] == "inputs.0"
    raw = '{"model": "acme/writer", "prompt": "once \\udfff", "max_tokens": 2}'
    answer = lm.post("/v1/completions", content=raw, headers={**ACME, "content-type": "application/json"})
    assert error_of(answer, 400)["param"] == "prompt"


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"best_of": 2}, "best_of"),
        ({"echo": True}, "echo"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"n": 9}, "n"),  # over the server's max_choices (8)
        ({"logprobs": 21}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"logit_bias": {"x": 10}}, "logit_bias.x"),
        ({"response_format": {"type": "json_object"}}, "response_format.type"),
        ({"temperature": -1}, "temperature"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 4}, "max_tokens"),  # over this app's max_new_tokens (3)
    ],
)
def test_openai_parameter_errors_name_the_parameter(lm, extra, param):
    body = {"model": "acme/writer", "prompt": "once upon", "max_tokens": 2} | extra
    error = error_of(lm.post("/v1/completions", json=body, headers=ACME), 400)
    assert error["param"] == param and param in error["message"]


def test_neutral_values_of_unsupported_parameters_are_accepted(lm):
    body = {"model": "acme/writer", "prompt": "once upon", "max_tokens": 2, "best_of": 1, "echo": False,
            "tools": [], "presence_penalty": 0, "logit_bias": {}, "response_format": {"type": "text"}, "user": "u-1"}
    assert lm.post("/v1/completions", json=body, headers=ACME).status_code == 200


def test_nan_temperature_is_a_400(lm):
    raw = '{"model": "acme/writer", "prompt": "x", "temperature": NaN}'
    answer = lm.post("/v1/completions", content=raw, headers={**ACME, "content-type": "application/json"})
    assert error_of(answer, 400)["param"] == "temperature"


def test_chat_roles_and_content_parts_not_served_are_400(lm):
    """Tools and images are refused by name; text parts are served (tests/serving/api/test_clients.py)."""
    image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]}
    for message in ({"role": "tool", "content": "x"}, image):
        body = {"model": "acme/writer", "messages": [message], "max_tokens": 2}
        assert error_of(lm.post("/v1/chat/completions", json=body, headers=ACME), 400)["param"].startswith("messages")


def test_unknown_models_are_404(lm):
    for model in ("gpt-4o", "acme/nope"):
        body = {"model": model, "prompt": "x", "max_tokens": 2}
        error = error_of(lm.post("/v1/completions", json=body, headers=ACME), 404)
        assert error["code"] == "model_not_found" and error["param"] == "model"


def test_prompt_over_the_context_is_refused_not_cut(lm):
    answer = lm.post("/v1/completions", json={"model": "llama", "prompt": LONG_PROMPT, "max_tokens": 2}, headers=ACME)
    assert error_of(answer, 400)["code"] == "context_length_exceeded"


def test_completions_on_an_encoder_is_a_client_error(client):
    error = error_of(client.post("/v1/completions", json={"model": "acme/sentiment", "prompt": "x"}, headers=ACME),
                     400)
    assert error["code"] == "wrong_task" and error["param"] == "model"


def test_oversized_body_is_refused_before_parsing(client):
    headers = {**ACME, "content-type": "application/json"}
    assert error_of(client.post("/v1/classify", content=b"{" + b" " * 20_000 + b"}", headers=headers), 413)

    def chunks():  # no Content-Length: a chunked body that grows past the limit
        yield b'{"adapter": "acme/sentiment", "inputs": ["'
        for _ in range(30):
            yield b"x" * 1000

    assert error_of(client.post("/v1/classify", content=chunks(), headers=headers), 413)["code"]


def test_unknown_route_and_method_keep_the_error_shape(client):
    assert error_of(client.get("/v1/nothing", headers=ACME), 404)["type"] == "not_found_error"
    assert error_of(client.get("/v1/classify", headers=ACME), 405)


def test_health_and_readiness_name_no_tenant(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.json() == {"status": "ready"} and "acme" not in ready.text
    assert client.get("/v1/admin/status", headers=ACME).status_code == 403
    assert client.get("/v1/admin/status", headers=ADMIN).json()["backbone"] == "bert"


def test_a_client_request_id_is_kept_and_a_bad_one_replaced(client):
    assert classify(client, "acme/sentiment").headers["x-request-id"].startswith("req-")
    mine = classify(client, "acme/sentiment", {**ACME, "x-request-id": "trace-0123456789"})
    assert mine.headers["x-request-id"] == "trace-0123456789"
    odd = classify(client, "acme/sentiment", {**ACME, "x-request-id": "a b\tc"})
    assert odd.headers["x-request-id"].startswith("req-")


def samples(client) -> dict:
    text = client.get("/metrics", headers=ADMIN).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
            for s in f.samples}


def count(samples_: dict, name: str, **labels) -> float:
    return sum(v for (n, ls), v in samples_.items() if n == name and labels.items() <= dict(ls).items())


def test_metrics_are_admin_only_bounded_and_count_refusals(client):
    assert client.get("/metrics", headers=ACME).status_code == 403
    before = samples(client)
    for i in range(5):
        classify(client, f"acme/invented-{i}")  # 404s: names no one published
    classify(client, "acme/sentiment", {})  # 401
    classify(client, "acme/sentiment", inputs=["x" * 401])  # 413
    classify(client, "acme/sentiment")  # 200
    after = samples(client)
    adapters = {dict(ls).get("adapter") for (n, ls) in after if n == "dcft_requests_total"}
    assert not any(a and a.startswith("acme/invented") for a in adapters) and "acme/sentiment" in adapters
    assert count(after, "dcft_requests_total", adapter="other", status="404") >= 5
    for status in ("401", "413", "404"):
        grew = count(after, "dcft_http_responses_total", route="/v1/classify", status=status) - count(
            before, "dcft_http_responses_total", route="/v1/classify", status=status)
        assert grew >= 1, status
    text = client.get("/metrics", headers=ADMIN).text
    assert "acme-key" not in text and "fine" not in text


def test_metrics_say_they_cover_one_ingress_replica_and_no_model_replica(client):
    text = client.get("/metrics", headers=ADMIN).text
    first = text.splitlines()[0]
    assert first.startswith("# ") and "ONE Ingress replica" in first and "ray_dcft_" in first
    found = samples(client)
    assert count(found, "dcft_metrics_scope", scope="ingress_replica", replica="local") == 1
    names = {n for n, _ in found}
    assert "dcft_requests_total" in names and not any(n.startswith(("dcft_batch", "dcft_bank")) for n in names)
    if promtool := shutil.which("promtool"):  # Prometheus' own linter of the exposition format
        done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_the_ray_mirror_records_every_edge_series_as_the_replica_does(models, monkeypatch):
    """Under Ray Serve each Ingress replica also records its series through ray.serve.metrics
    (exported cluster-wide as ray_dcft_*): the same values, the same bounded labels."""
    made = record_ray_metrics(monkeypatch)
    service, hub = models["bert"]
    limits = LimitsConfig(max_inputs_per_request=4, max_input_chars=400,
                          tenant_quotas={"globex": TenantQuota(requests_per_s=0.01, burst=1)})
    app = create_app(LocalBackend(service), KeyRing(KEYS), limits, hub, "bert", metrics_mirror=ServeIngressMetrics())
    with TestClient(app, raise_server_exceptions=False) as mirrored:
        statuses = [classify(mirrored, "acme/sentiment").status_code, classify(mirrored, "acme/invented").status_code,
                    classify(mirrored, "acme/sentiment", {}).status_code,
                    classify(mirrored, "acme/sentiment", inputs=["x" * 401]).status_code,
                    classify(mirrored, "globex/sentiment", GLOBEX).status_code,
                    classify(mirrored, "globex/sentiment", GLOBEX).status_code]
        assert statuses == [200, 404, 401, 413, 200, 429]
        assert mirrored.get("/metrics", headers=ADMIN).status_code == 200
    local = {("ray_" + s.name, labels_key(s.labels)): s.value
             for family in app.state.edge.metrics.registry.collect() for s in family.samples
             if not s.name.endswith("_bucket") and s.name != "dcft_metrics_scope"}
    assert exported_samples(made) == local
    assert local[("ray_dcft_requests_total", labels_key({"adapter": "other", "route": "classify", "status": "404"}))]
    assert local[("ray_dcft_rate_limited_total", labels_key({"tenant": "globex", "limit": "requests"}))] == 1
    assert local[("ray_dcft_queue_depth", ())] == 0


class FailingBackend(LocalBackend):
    """The real backend, but classify fails with an error we did not raise on purpose."""

    async def call(self, method, *args):
        if method == "classify":
            raise RuntimeError("secret internal detail at /srv/replica.py line 12")
        return await super().call(method, *args)


def test_an_unexpected_error_is_a_bare_500_with_a_request_id(models, caplog):
    with client_for(models, "bert", FailingBackend(models["bert"][0])) as failing:
        answer = classify(failing, "acme/sentiment")
    error = error_of(answer, 500)
    assert error["type"] == "server_error" and "secret" not in answer.text and error["request_id"] in error["message"]
    assert error["request_id"] in caplog.text and "secret internal detail" in caplog.text  # logged, not sent


class SlowBackend(LocalBackend):
    """The real backend, answering only after `delay_s` (a model call that overruns)."""

    def __init__(self, service: ModelService, delay_s: float):
        super().__init__(service)
        self.delay_s = delay_s

    async def call(self, method, *args):
        if method == "classify":
            await asyncio.sleep(self.delay_s)
        return await super().call(method, *args)


def test_a_model_call_over_the_timeout_answers_504(models):
    backend = SlowBackend(models["bert"][0], delay_s=2.0)
    with client_for(models, "bert", backend, request_timeout_s=0.2) as slow_client:
        error = error_of(classify(slow_client, "acme/sentiment"), 504)
        assert "0.2 s" in error["message"] and error["type"] == "server_error"
        backend.delay_s = 0.0
        assert classify(slow_client, "acme/sentiment").status_code == 200


def test_request_rate_quota_answers_429_for_that_tenant_only(models):
    quotas = {"acme": TenantQuota(requests_per_s=0.01, burst=2)}
    with client_for(models, "bert", tenant_quotas=quotas) as limited:
        assert [classify(limited, "acme/sentiment").status_code for _ in range(2)] == [200, 200]
        refused = classify(limited, "acme/sentiment")
        error = error_of(refused, 429)
        assert error["type"] == "rate_limit_error" and int(refused.headers["Retry-After"]) >= 1
        assert classify(limited, "globex/sentiment", GLOBEX).status_code == 200
        assert count(samples(limited), "dcft_rate_limited_total", tenant="acme", limit="requests") == 1


def test_each_of_several_ingress_replicas_enforces_its_share_of_a_quota(models):
    quotas = {"acme": TenantQuota(requests_per_s=0.01, burst=4, tokens_per_min=1000, max_concurrent=5)}
    with client_for(models, "bert", tenant_quotas=quotas) as limited:
        admission = limited.app.state.edge.admission
        admission.peers = 2  # as Serve's count tells each Ingress replica
        assert [classify(limited, "acme/sentiment").status_code for _ in range(3)] == [200, 200, 429]
        share = admission.tenant("acme").quota
        assert (share.burst, share.tokens_per_min, share.max_concurrent) == (2, 500, 3)
        assert share.requests_per_s == pytest.approx(0.005)
        assert classify(limited, "globex/sentiment", GLOBEX).status_code == 200  # other tenants: their own share


def test_token_quota_is_charged_with_the_tokens_used(models):
    quotas = {"acme": TenantQuota(tokens_per_min=1)}
    with client_for(models, "bert", tenant_quotas=quotas) as limited:
        assert classify(limited, "acme/sentiment").status_code == 200  # overdraws the bucket once
        assert error_of(classify(limited, "acme/sentiment"), 429)["message"].startswith("over 1 tokens per minute")


def test_concurrency_quota_keeps_one_tenant_from_filling_the_queue(models):
    backend = SlowBackend(models["bert"][0], delay_s=0.5)
    quotas = {"acme": TenantQuota(max_concurrent=1)}
    with client_for(models, "bert", backend, tenant_quotas=quotas) as limited:
        statuses, started = [], threading.Barrier(3)

        def send(headers):
            started.wait()
            adapter = "acme/sentiment" if headers is ACME else "globex/sentiment"
            statuses.append((headers is ACME, classify(limited, adapter, headers).status_code))

        threads = [threading.Thread(target=send, args=(h,)) for h in (ACME, ACME, GLOBEX)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(s for is_acme, s in statuses if is_acme) == [200, 429]
    assert [s for is_acme, s in statuses if not is_acme] == [200]


def test_max_tokens_is_capped_per_request(lm):
    body = {"model": "llama", "prompt": "once upon", "temperature": 0}
    over = error_of(lm.post("/v1/completions", json=body | {"max_tokens": 4}, headers=ACME), 400)
    assert "limit is 3" in over["message"]
    within = lm.post("/v1/completions", json=body | {"max_completion_tokens": 3}, headers=ACME)
    assert within.status_code == 200 and within.json()["usage"]["completion_tokens"] <= 3


def test_chat_renders_in_the_replica_and_answers(lm):
    body = {"model": "acme/writer", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    answer = lm.post("/v1/chat/completions", json=body, headers=ACME)
    assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["role"] == "assistant"
    assert answer.json()["usage"]["prompt_tokens"] > 1


class WithALaggingReplica(LocalBackend):
    """The local replica plus a second one that never catches up with the registry."""

    async def replicas(self):
        return [*await super().replicas(), ReplicaView("lagging", "node-2", {"registry_token": "an old change"})]


def test_an_admin_change_answers_with_each_replicas_state_after_a_bounded_wait(models):
    service, hub = models["bert"]
    limits = LimitsConfig(max_inputs_per_request=4)
    app = create_app(WithALaggingReplica(service), KeyRing(KEYS), limits, hub, "bert", converge_timeout_s=0.5)
    with TestClient(app) as lagging:
        started = time.monotonic()
        r = lagging.post("/v1/adapters/acme/sentiment/load", json={"pin": True}, headers=ADMIN)
        assert r.status_code == 200 and 0.5 <= time.monotonic() - started < 10
        rollout = r.json()["rollout"]
        assert (rollout["replicas"], rollout["converged"]) == (2, 1)
        assert {s["replica"]: s["converged"] for s in rollout["replica_states"]} == {"local": True, "lagging": False}
        own = lagging.post("/v1/adapters/acme/sentiment/unload", headers=ACME).json()["rollout"]
        assert own == {"replicas": 2, "converged": 1}  # a tenant sees counts, not the fleet's layout
    assert hub.fleet.all()["acme/sentiment"].state == "unloaded"


def test_usage_counts_a_prompt_once_for_its_n_choices_streamed_or_whole():
    from serving.api.openai_format import UsageTally, usage_of
    from serving.calls import DecodeEvent, GenerateResult
    from serving.rows import Generation

    # two prompts (5 and 7 tokens), n=2: choices 0, 1 are the first prompt's, 2, 3 the second's
    made = [([1, 2], 5), ([3], 5), ([4], 7), ([], 7)]
    whole = GenerateResult(None, None, [Generation(tokens=tokens, prompt_tokens=prompt) for tokens, prompt in made])
    assert usage_of(whole, 2).model_dump() == {"prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}
    tally = UsageTally(2)  # streamed: the prompt's size comes on each choice's first event only
    for event in [DecodeEvent(0, tokens=(1,), prompt_tokens=5), DecodeEvent(2, tokens=(4,), prompt_tokens=7),
                  DecodeEvent(1, tokens=(3,), prompt_tokens=5), DecodeEvent(0, tokens=(2,)),
                  DecodeEvent(3, finish_reason="stop", prompt_tokens=7)]:
        tally.add(event)
    assert tally.usage() == usage_of(whole, 2)
