"""The HTTP API under schema-driven fuzzing (schemathesis over the app's own OpenAPI spec).

Every operation gets generated requests, valid and invalid by the schema, sent with
the admin key, a tenant key, or no key (then the Authorization header is fuzzed too),
in-process to an encoder app (tiny BERT) and a decoder app (tiny Llama). No input may
draw a 5xx, and every 4xx answer keeps the one error shape (OpenAI's, with a request id).
Keys are checked in constant time, and neither the app's logs nor
/metrics ever hold an API key or a request's text.

`pytest -s tests/serving/api/test_fuzz_api.py` prints the cases tried per operation.
"""

from __future__ import annotations

import hmac
import logging

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st

from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_bert_dir, tiny_llama_dir
from serving.api import auth
from serving.api.app import create_app
from serving.api.auth import KeyRing, UnauthenticatedError
from serving.backend import LocalBackend
from serving.config import EngineConfig, LimitsConfig
from serving.service import ModelService

schemathesis = pytest.importorskip("schemathesis")
from schemathesis import GenerationMode  # noqa: E402

KEYS = {
    "acme-key-0123456789abcdef": "acme",
    "globex-key-0123456789abcd": "globex",
    "admin-key-0123456789abcdef": "admin",
}
CALLERS = {"admin": "admin-key-0123456789abcdef", "tenant": "acme-key-0123456789abcdef", "anonymous": None}
# Real names, so part of the fuzzing reaches the model and not only the 404 path.
KNOWN_REFS = {"bert": ["acme/sentiment", "globex/sentiment", "public/score", "bert"], "llama": ["acme/writer", "llama"]}
# The schema allows max_tokens up to 8192 and the engine decodes that many steps (seconds
# to minutes on CPU, holding the engine); the fuzz caps it so a case stays milliseconds.
MAX_DECODE = 4
EXAMPLES = {"admin": 25, "tenant": 12, "anonymous": 6}  # per operation and generation mode
# No "explain" phase: it traces every line of a failing case through the whole app.
PHASES = (Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink)


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    """An encoder app and a decoder app, each over its own hub, with three tenants' keys."""
    root = tmp_path_factory.mktemp("fuzz-api")
    bert, llama = tiny_bert_dir(root / "bert"), tiny_llama_dir(root / "llama")
    bert_hub, llama_hub = AdapterHub(root / "hub-bert"), AdapterHub(root / "hub-llama")
    bert_hub.publish(random_adapter(bert, root / "a", "seq_cls", seed=1, kernel=4), "acme/sentiment")
    bert_hub.publish(random_adapter(bert, root / "b", "seq_cls", seed=2, kernel=4), "globex/sentiment")
    bert_hub.publish(random_adapter(bert, root / "c", "regression", seed=3, kernel=4), "public/score")
    llama_hub.publish(random_adapter(llama, root / "d", "causal_lm", seed=4, kernel=4), "acme/writer")
    limits = LimitsConfig(max_inputs_per_request=4, max_input_chars=100, max_body_bytes=10_000)

    def app(model_dir, hub, name):
        service = ModelService(EngineConfig(model=str(model_dir), hub=hub.url, kernel_size=4))
        return create_app(LocalBackend(service), KeyRing(KEYS), limits, hub, name)

    return {"bert": app(bert, bert_hub, "bert"), "llama": app(llama, llama_hub, "llama")}


# --- no 5xx on any generated input ------------------------------------------------------

ERROR_FIELDS = {"message", "type", "param", "code", "request_id"}


def check_error_shape(response) -> None:
    if response.status_code < 400:
        return
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS, response.text[:500]
    assert body["error"]["message"] and body["error"]["type"].endswith("_error")
    header = response.headers["x-request-id"]  # schemathesis keeps a list per header
    assert body["error"]["request_id"] == (header[0] if isinstance(header, list) else header)


def steer(case, ref: str | None):
    """Point a generated case at a real adapter (when `ref`) and cap its decode length."""
    body = case.body if isinstance(case.body, dict) else {}
    if ref is not None:
        for field in ("adapter", "model"):
            if field in body:
                body[field] = ref
        if case.path_parameters and {"tenant", "task"} <= set(case.path_parameters) and "/" in ref:
            case.path_parameters["tenant"], case.path_parameters["task"] = ref.split("/")
    if "prompt" in body or "messages" in body:
        body.setdefault("max_tokens", MAX_DECODE)  # the default (16) is four times the cap
    for field in ("max_tokens", "max_completion_tokens"):
        if type(body.get(field)) in (int, float):  # 3809.0 is a valid int to pydantic
            body[field] = min(body[field], MAX_DECODE)
    return case


def fuzz_operation(operation, mode: GenerationMode, key: str | None, refs: list[str], examples: int) -> int:
    """Send `examples` generated requests to one operation; every answer must be below 500."""
    headers = {"Authorization": f"Bearer {key}"} if key else None  # None: the generated header stays
    tried = 0

    @settings(
        max_examples=examples, deadline=None, database=None, phases=PHASES,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(case=operation.as_strategy(generation_mode=mode), ref=st.none() | st.sampled_from(refs))
    def send(case, ref):
        nonlocal tried
        tried += 1
        steer(case, ref)
        note(f"{case.method} {case.formatted_path} body={case.body!r}")
        response = case.call(headers=headers)
        assert response.status_code < 500, f"{response.status_code} from {operation.label}: {response.text[:500]}"
        check_error_shape(response)

    send()
    return tried


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("backbone", ["bert", "llama"])
def test_no_generated_request_draws_a_5xx(apps, backbone, caller, record_property):
    schema = schemathesis.openapi.from_asgi("/openapi.json", apps[backbone])
    for result in schema.get_all_operations():
        operation = result.ok()
        # Only a body can be made invalid: path segments and the header are any string already.
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if len(operation.body) else [])
        counts = {
            mode.value: fuzz_operation(operation, mode, CALLERS[caller], KNOWN_REFS[backbone], EXAMPLES[caller])
            for mode in modes
        }
        target = f"{backbone} {operation.label} [{caller}]"
        split = ", ".join(f"{n} {mode}" for mode, n in counts.items())
        print(f"\nfuzz target {target}: {sum(counts.values())} cases ({split})")
        record_property(f"fuzz cases: {target}", sum(counts.values()))


@pytest.mark.parametrize("backbone", ["bert", "llama"])
def test_no_boundary_request_draws_a_5xx(apps, backbone, record_property):
    """Schemathesis' coverage phase: every field at its bounds, each wrong type, missing and
    unknown properties, other methods and content types; sent with the admin key."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", apps[backbone])
    headers = {"Authorization": f"Bearer {CALLERS['admin']}"}
    refs = [None, *KNOWN_REFS[backbone]]
    for result in schema.get_all_operations():
        operation = result.ok()
        cases = schema.iter_coverage_cases(
            operation, generation_modes=list(GenerationMode),
            generation_config=schema.config.generation_for(operation=operation),
        )
        tried = 0
        for tried, case in enumerate(cases, start=1):
            steer(case, refs[tried % len(refs)])
            response = case.call(headers=headers)
            assert response.status_code < 500, (
                f"{response.status_code} from {case.method} {case.formatted_path} body={case.body!r}: "
                f"{response.text[:500]}"
            )
            check_error_shape(response)
        target = f"{backbone} {operation.label} [coverage]"
        print(f"\nfuzz target {target}: {tried} cases")
        record_property(f"fuzz cases: {target}", tried)


# --- keys: constant-time checks, never in logs or metrics -------------------------------


def test_every_key_check_compares_against_every_key(monkeypatch, record_property):
    """No early exit: a right key, a wrong key and a near miss all cost len(keys) comparisons."""
    ring = KeyRing(KEYS)
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    tried = 0
    keys = st.one_of(st.sampled_from(list(KEYS)), st.text(max_size=40), st.sampled_from([k[:-1] + "x" for k in KEYS]))

    @settings(max_examples=200, deadline=None, database=None, phases=PHASES)
    @given(key=keys)
    def check(key):
        nonlocal tried
        tried += 1
        calls.clear()
        try:
            who = ring.authenticate(f"Bearer {key}")
        except UnauthenticatedError:
            who = None
        assert (who is not None) == (key.strip() in KEYS)
        assert len(calls) in (0, len(KEYS))  # 0: nothing after "Bearer " to compare
        assert len(calls) == len(KEYS) or not key.strip()

    check()
    print(f"\nfuzz target auth: key comparisons: {tried} cases")
    record_property("fuzz cases: auth key comparisons", tried)


SECRET_TEXT = "zebra-quartz-unicorn-4711"
WRONG_KEY = "wrong-key-do-not-log-0123456789"


def test_logs_and_metrics_hold_no_key_and_no_text(apps, caplog):
    caplog.set_level(logging.DEBUG)
    keys = [*KEYS, WRONG_KEY]
    with TestClient(apps["bert"]) as client, TestClient(apps["llama"]) as lm:
        for key in keys:
            headers = {"Authorization": f"Bearer {key}"}
            for adapter in ("acme/sentiment", "globex/sentiment", "acme/missing", "bad name"):
                client.post("/v1/classify", json={"adapter": adapter, "inputs": [SECRET_TEXT]}, headers=headers)
            client.post("/v1/classify", json={"adapter": "acme/sentiment", "inputs": [SECRET_TEXT * 10]},
                        headers=headers)
            lm.post("/v1/completions", json={"model": "acme/writer", "prompt": SECRET_TEXT, "max_tokens": 2},
                    headers=headers)
            lm.post("/v1/chat/completions", headers=headers, json={
                "model": "llama", "max_tokens": 2, "messages": [{"role": "user", "content": SECRET_TEXT}]})
        admin = {"Authorization": f"Bearer {CALLERS['admin']}"}
        metrics = client.get("/metrics", headers=admin).text + lm.get("/metrics", headers=admin).text
    assert "dcft_requests_total" in metrics
    for where, text in (("logs", caplog.text), ("/metrics", metrics)):
        assert SECRET_TEXT not in text, f"request text in {where}"
        leaked = [key for key in keys if key in text or key[:12] in text]
        assert not leaked, f"API key in {where}"
