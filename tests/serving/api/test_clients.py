"""What real OpenAI clients send and expect, in-process (TestClient over the real engine, no Ray):
chat shapes OpenAI accepts, model cards, the max_tokens defaults, streams bounded by time to first
token and by idle gaps rather than a whole-request timeout, honest status counts, and a drain."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_llama_dir
from serving.api.app import create_app
from serving.api.auth import KeyRing
from serving.api.drain import Drain
from serving.api.errors import rule_for, status_for
from serving.api.middleware import CLIENT_CLOSED, RequestContext
from serving.backend import LocalBackend
from serving.config import EngineConfig, LimitsConfig
from serving.errors import ShuttingDownError
from serving.metrics import RequestMetrics
from serving.service import ModelService

KEY, ADMIN_KEY = "acme-key-0123456789abcdef", "admin-key-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {KEY}", "x-request-id": "client-req-0001"}
EOS_ID = "3"  # the tiny tokenizer's </s>: biased away so a generation runs to its bound


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    model_dir = tiny_llama_dir(root / "llama")
    hub = AdapterHub(str(root / "hub"))
    hub.publish(random_adapter(model_dir, root / "w", "causal_lm", seed=4, kernel=4), "acme/writer")
    service = ModelService(EngineConfig(model=str(model_dir), hub=hub.url, kernel_size=4))
    yield service, hub
    service.close()


def client_of(llama, backend=None, **limits) -> TestClient:
    service, hub = llama
    keys = KeyRing({KEY: "acme", ADMIN_KEY: "admin"})
    app = create_app(backend or LocalBackend(service), keys, LimitsConfig(**limits), hub, "llama")
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(llama):
    with client_of(llama, max_new_tokens=40) as test_client:
        yield test_client


def chat(client, messages, **extra):
    body = {"model": "acme/writer", "messages": messages, "temperature": 0} | extra
    return client.post("/v1/chat/completions", json=body, headers=HEADERS)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": [{"type": "text", "text": "a gripping"}, {"type": "text", "text": "film"}]}],
    [{"role": "user", "content": "a gripping film", "name": "ann"}],
    [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "a gripping film"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "film"}],
], ids=["text-parts", "name", "developer", "assistant-null"])
def test_chat_shapes_openai_accepts_are_answered(client, messages):
    answer = chat(client, messages, max_tokens=3)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] >= 1


def test_text_parts_read_as_the_same_text_joined():
    """Parts join with newlines into the one string the template renders (what vLLM does too)."""
    from serving.api.schemas import ChatMessage

    message = ChatMessage(role="developer", content=[{"type": "text", "text": "a"}, {"type": "text", "text": "b"}])
    assert message.text() == "a\nb" and message.template_role == "system"


@pytest.mark.parametrize("messages, param", [
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]}], "messages.0.content"),
    ([{"role": "tool", "content": "42", "tool_call_id": "t1"}], "messages.0.role"),
    ([{"role": "user", "content": None}], "messages.0"),
], ids=["image-part", "tool-role", "user-null"])
def test_chat_shapes_not_served_are_400_naming_the_parameter(client, messages, param):
    answer = chat(client, messages, max_tokens=3)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param


def test_chat_without_max_tokens_runs_to_the_servers_limit_not_16(client):
    answer = chat(client, [{"role": "user", "content": "film"}], logit_bias={EOS_ID: -100})
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 40  # the limit; completions keep OpenAI's 16
    plain = client.post("/v1/completions", headers=HEADERS, json={
        "model": "acme/writer", "prompt": "film", "temperature": 0, "logit_bias": {EOS_ID: -100}})
    assert plain.json()["usage"]["completion_tokens"] == 16


def test_chat_without_max_tokens_near_the_context_end_stops_there(llama):
    """A chat whose prompt leaves fewer than the limit's 64 tokens of the 128-token context decodes
    to the context's end, where an explicit max_tokens of 64 would be refused."""
    with client_of(llama, max_new_tokens=64, max_input_chars=10_000) as roomy:
        for words in range(1, 60):
            messages = [{"role": "user", "content": " ".join(["film"] * words)}]
            answer = chat(roomy, messages, logit_bias={EOS_ID: -100})
            assert answer.status_code == 200, answer.text
            usage = answer.json()["usage"]
            if usage["prompt_tokens"] + 64 > 128:
                assert usage["prompt_tokens"] + usage["completion_tokens"] == 128
                assert chat(roomy, messages, max_tokens=64).status_code == 400
                return
        pytest.fail("no prompt came near the context's end")


def test_model_cards_have_created_and_one_can_be_retrieved(client):
    cards = client.get("/v1/models", headers=HEADERS).json()["data"]
    assert all(card["created"] > 1_600_000_000 for card in cards)
    card = client.get("/v1/models/acme/writer", headers=HEADERS).json()
    assert card["id"] == "acme/writer" and card["version"] == 1 and card["owned_by"] == "acme"
    assert client.get("/v1/models/acme/writer@1", headers=HEADERS).json()["version"] == 1
    assert client.get("/v1/models/llama", headers=HEADERS).json()["id"] == "llama"
    missing = client.get("/v1/models/acme/nope", headers=HEADERS)
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"


def test_small_things_real_clients_trip_on(client):
    oov = client.post("/v1/completions", headers=HEADERS, json={
        "model": "acme/writer", "prompt": "film", "max_tokens": 2, "logit_bias": {"999999": 5}})
    assert oov.status_code == 400 and oov.json()["error"]["param"] == "logit_bias"
    empty = client.post("/v1/completions", headers=HEADERS)
    assert empty.status_code == 400 and "request body" in empty.json()["error"]["message"]
    text = client.post("/v1/completions", headers=HEADERS | {"Content-Type": "text/plain"},
                       content=b'{"model": "llama", "prompt": "x"}')
    assert text.status_code == 415 and text.json()["error"]["code"] == "unsupported_media_type"


class PacedBackend(LocalBackend):
    """The real stream, its events spaced `gap_s` apart; after `stall_after` events, it goes silent."""

    def __init__(self, service: ModelService, gap_s: float, stall_after: int | None = None):
        super().__init__(service)
        self.gap_s, self.stall_after = gap_s, stall_after

    async def _paced(self, events):
        count = 0
        async for event in events:
            if count == self.stall_after:
                await asyncio.sleep(3600)
            if count:
                await asyncio.sleep(self.gap_s)
            count += 1
            yield event

    def stream(self, method, *args):
        return self._paced(super().stream(method, *args))


def stream_lines(response) -> list[str]:
    return [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]


def responses_counted(client) -> dict[str, float]:
    """`dcft_http_responses_total` by status, for the completions route."""
    text = client.get("/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    return {sample.labels["status"]: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "dcft_http_responses_total"
            and sample.labels.get("route") == "/v1/completions"}


def test_a_stream_longer_than_the_request_timeout_finishes_while_tokens_keep_coming(llama):
    """request_timeout_s bounds the first token, not the stream: 24 tokens 50 ms apart outlast 0.3 s."""
    backend = PacedBackend(llama[0], gap_s=0.05)
    with client_of(llama, backend, request_timeout_s=0.3) as paced:
        body = {"model": "acme/writer", "prompt": "film", "max_tokens": 24, "temperature": 0, "stream": True,
                "logit_bias": {EOS_ID: -100}}
        lines = stream_lines(paced.post("/v1/completions", json=body, headers=HEADERS))
        assert lines[-1] == "[DONE]" and all("error" not in json.loads(line) for line in lines[:-1])
        assert sum(len(json.loads(line)["choices"][0]["text"]) > 0 for line in lines[:-1]) >= 12


@pytest.fixture(scope="module")
def roomy_llama(tmp_path_factory):
    """The tiny Llama with 512 positions: room for a prompt and the default max_new_tokens of 256."""
    root = tmp_path_factory.mktemp("roomy")
    model_dir = tiny_llama_dir(root / "llama", context=512)
    hub = AdapterHub(str(root / "hub"))
    hub.publish(random_adapter(model_dir, root / "w", "causal_lm", seed=4, kernel=4), "acme/writer")
    service = ModelService(EngineConfig(model=str(model_dir), hub=hub.url, kernel_size=4))
    yield service, hub
    service.close()


def test_a_256_token_stream_beside_16_others_completes_under_the_default_settings(roomy_llama):
    """17 streams of the most tokens allowed, decoded together by the real engine, each token paced
    125 ms apart (about a 17-row SmolLM2 step on 2 CPU cores): each outlasts request_timeout_s and
    finishes whole, where a whole-request bound of request_timeout_s cut such streams."""
    defaults = LimitsConfig()
    body = {"model": "acme/writer", "prompt": "film", "max_tokens": defaults.max_new_tokens, "temperature": 0,
            "stream": True, "logit_bias": {EOS_ID: -100}}
    with client_of(roomy_llama, PacedBackend(roomy_llama[0], gap_s=0.125)) as paced, ThreadPoolExecutor(17) as pool:
        start = time.monotonic()
        answers = list(pool.map(lambda _: paced.post("/v1/completions", json=body, headers=HEADERS), range(17)))
        took = time.monotonic() - start
    assert took > defaults.request_timeout_s
    for answer in answers:
        lines = stream_lines(answer)
        assert lines[-1] == "[DONE]" and all("error" not in json.loads(line) for line in lines[:-1])
        assert len(lines[:-1]) == defaults.max_new_tokens  # one chunk a token, the last with its finish reason
        assert json.loads(lines[-2])["choices"][0]["finish_reason"] == "length"


def test_a_stalled_stream_ends_with_a_timeout_event_carrying_the_request_id_then_done(llama):
    backend = PacedBackend(llama[0], gap_s=0.0, stall_after=3)
    with client_of(llama, backend, stream_idle_timeout_s=0.3) as stalled:
        body = {"model": "acme/writer", "prompt": "film", "max_tokens": 24, "stream": True,
                "logit_bias": {EOS_ID: -100}}
        before = responses_counted(stalled).get("504", 0)
        response = stalled.post("/v1/completions", json=body, headers=HEADERS)
        lines = stream_lines(response)
        assert lines[-1] == "[DONE]"
        error = json.loads(lines[-2])["error"]
        assert error["code"] == "timeout" and error["request_id"] == "client-req-0001"
        assert responses_counted(stalled).get("504", 0) == before + 1  # counted as the timeout it was


def test_a_request_whose_client_hung_up_counts_as_499_never_5xx():
    async def hung_up(scope, receive, send):
        raise asyncio.CancelledError  # what the proxy does to a request whose client went away

    metrics = RequestMetrics()
    app = RequestContext(hung_up, metrics)
    scope = {"type": "http", "path": "/v1/completions", "headers": [], "method": "POST"}
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(app(scope, None, None))
    exposition = metrics.exposition().decode()
    counted = {sample.labels["status"] for family in text_string_to_metric_families(exposition)
               for sample in family.samples if sample.name == "dcft_http_responses_total"}
    assert counted == {str(CLIENT_CLOSED)}


class FailingBackend(LocalBackend):
    """A backend with a bug of ours: every model call raises something we did not raise on purpose."""

    async def call(self, method, *args):
        raise RuntimeError("boom in /srv/secret/path")


def edge_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("serving.api")]


def test_a_refusal_logs_one_info_line_and_a_500_an_error_with_its_traceback_under_the_bodys_id(llama, caplog):
    with client_of(llama) as plain, caplog.at_level(logging.INFO, logger="serving"):
        refused = plain.post("/v1/completions", headers=HEADERS, json={"model": "acme/nope", "prompt": "x"})
    assert refused.status_code == 404
    (line,) = edge_records(caplog)
    assert line.levelno == logging.INFO and line.exc_info is None
    assert all(part in line.getMessage() for part in ("client-req-0001", "404", "model_not_found", "tenant=acme"))
    caplog.clear()
    with client_of(llama, FailingBackend(llama[0])) as failing, caplog.at_level(logging.INFO, logger="serving"):
        failed = failing.post("/v1/completions", headers=HEADERS, json={"model": "llama", "prompt": "x"})
    body = failed.json()["error"]
    assert failed.status_code == 500 and "secret" not in failed.text and body["request_id"] == "client-req-0001"
    (line,) = edge_records(caplog)
    assert line.levelno == logging.ERROR and line.exc_info is not None and "client-req-0001" in line.getMessage()


def wait_until(check, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "not within the deadline"
        time.sleep(0.01)


def test_a_drain_refuses_new_requests_lets_running_streams_finish_and_ends_the_rest_at_its_bound(llama):
    """Tokens 50 ms apart: a 20-token stream ends within the 2 s bound, a 100-token one is ended by it."""
    with client_of(llama, PacedBackend(llama[0], gap_s=0.05), drain_timeout_s=2.0) as edge, \
            ThreadPoolExecutor(3) as pool:
        drain = edge.app.state.edge.drain

        def stream(max_tokens: int, request_id: str):
            body = {"model": "acme/writer", "prompt": "film", "max_tokens": max_tokens, "temperature": 0,
                    "stream": True, "logit_bias": {EOS_ID: -100}}
            return edge.post("/v1/completions", json=body, headers=HEADERS | {"x-request-id": request_id})

        short, long = pool.submit(stream, 20, "short-0001"), pool.submit(stream, 100, "long-0001")
        wait_until(lambda: drain.running == 2)
        outcome = pool.submit(edge.portal.call, drain.drain)
        wait_until(lambda: drain.draining)
        assert not short.done()  # it runs on while the drain refuses the next request
        refused = edge.post("/v1/completions", headers=HEADERS, json={"model": "acme/writer", "prompt": "x"})
        assert refused.status_code == 503 and refused.headers["retry-after"]
        error = refused.json()["error"]
        assert error["code"] == "shutting_down" and error["request_id"] == refused.headers["x-request-id"]
        assert edge.get("/readyz").status_code == 503 and edge.get("/healthz").status_code == 200
        finished = stream_lines(short.result())
        assert finished[-1] == "[DONE]" and all("error" not in json.loads(line) for line in finished[:-1])
        assert sum(json.loads(line)["choices"][0]["text"] != "" for line in finished[:-1]) >= 10
        ended = stream_lines(long.result())
        assert ended[-1] == "[DONE]"
        assert json.loads(ended[-2])["error"] | {"message": ""} == {
            "message": "", "type": "server_error", "param": None, "code": "shutting_down", "request_id": "long-0001"}
        assert outcome.result() == {"ended_by_bound": 1, "still_running": 0}
        assert responses_counted(edge)["503"] == 2  # the refusal and the stream ended by the bound


def test_a_request_still_waiting_on_the_model_at_the_drain_bound_ends_with_503_shutting_down():
    """What a non-stream request meets (Edge.within_timeout): the bound wakes its wait, long before its own timeout."""
    drain = Drain(timeout_s=0.1)

    async def drained() -> dict[str, int]:
        with drain.admitted():
            waiting = asyncio.ensure_future(drain.first(asyncio.sleep(3600), timeout_s=60))
            outcome = asyncio.ensure_future(drain.drain(grace_s=5))
            with pytest.raises(ShuttingDownError) as ended:
                await waiting
        assert status_for(ended.value) == 503 and rule_for(ended.value)[2] == "shutting_down"
        return await outcome

    start = time.monotonic()
    assert asyncio.run(drained()) == {"ended_by_bound": 1, "still_running": 0}
    assert time.monotonic() - start < 5
