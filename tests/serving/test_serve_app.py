"""The Ray Serve app over real HTTP on 127.0.0.1 (one Ray cluster for the module).

Two apps on one Serve instance: a tiny BERT encoder at /enc (classification) and
a tiny Llama at /lm (completions), each with its own hub, API keys from a file.
"""

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_bert_dir, tiny_llama_dir
from benchmarks.harness import free_port
from serving.config import EngineConfig, LimitsConfig, ServeConfig, TenantQuota
from tests.serving.traffic import same_results

pytestmark = pytest.mark.timeout(900)  # the first test also waits for Ray and the replicas to start

KEYS = {
    "acme-key-0123456789abcdef": "acme",
    "globex-key-0123456789abcd": "globex",
    "admin-key-0123456789abcdef": "admin",
    "initech-key-0123456789abc": "initech",  # a tenant on a tight request quota
}
ACME, GLOBEX, ADMIN, INITECH = ({"Authorization": f"Bearer {k}"} for k in KEYS)
KEY_OF = {tenant: key for key, tenant in KEYS.items()}


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    pytest.importorskip("ray")
    from serving.launch import start, stop

    root = tmp_path_factory.mktemp("serve")
    bert, llama = tiny_bert_dir(root / "bert"), tiny_llama_dir(root / "llama")
    enc_hub, lm_hub = AdapterHub(str(root / "hub-enc")), AdapterHub(str(root / "hub-lm"))
    enc_hub.publish(random_adapter(bert, root / "s1", "seq_cls", seed=1, kernel=4), "acme/sentiment")
    enc_hub.publish(
        random_adapter(bert, root / "s2", "seq_cls", seed=2, kernel=4, labels=("a", "b", "c")), "globex/topic"
    )
    enc_hub.publish(random_adapter(bert, root / "s3", "regression", seed=3, kernel=4), "public/score")
    lm_hub.publish(random_adapter(llama, root / "l1", "causal_lm", seed=4, kernel=4), "acme/writer")
    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    quotas = {"initech": TenantQuota(requests_per_s=0.01, burst=1)}
    limits = LimitsConfig(max_inputs_per_request=8, max_input_chars=500, max_body_bytes=20_000, tenant_quotas=quotas)
    common = {"api_keys_file": str(keys_file), "limits": limits, "watch_interval_s": 0.5, "max_batch_size": 16}
    apps = {
        "/enc": ServeConfig(engine=EngineConfig(model=str(bert), hub=enc_hub.url, kernel_size=4), **common),
        "/lm": ServeConfig(engine=EngineConfig(model=str(llama), hub=lm_hub.url, kernel_size=4), **common),
    }
    base = start(apps, port=free_port(), timeout_s=240, names={prefix: prefix.strip("/") for prefix in apps})
    yield {"base": base, "root": root, "bert": bert, "enc_hub": enc_hub}
    stop()


def post(app, path, body, headers=ACME):
    return httpx.post(f"{app['base']}{path}", json=body, headers=headers, timeout=60)


def metrics(app, prefix="/enc") -> dict:
    """The app's /metrics: the edge series of the Ingress replica that answers."""
    text = httpx.get(f"{app['base']}{prefix}/metrics", headers=ADMIN, timeout=30).raise_for_status().text
    return parsed(text)


def engine_metrics(app_name="enc") -> dict:
    """The model replica's own series (one replica here), asked of it through a handle."""
    from ray import serve

    handle = serve.get_deployment_handle("AdapterModel", app_name=app_name)
    return parsed(handle.metrics_text.remote().result(timeout_s=30).decode())


def parsed(text: str) -> dict:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def ray_samples() -> list:
    """Every sample on this node's Ray metrics export port (where Prometheus scrapes)."""
    import ray

    text = httpx.get(f"http://127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}/metrics", timeout=10).text
    return [s for f in text_string_to_metric_families(text) for s in f.samples]


def total(samples: dict, name: str, **labels) -> float:
    return sum(
        v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == v2 for k, v2 in labels.items())
    )


def test_classify(app):
    r = post(
        app,
        "/enc/v1/classify",
        {"adapter": "acme/sentiment", "inputs": ["great film", {"text": "a", "text_pair": "b"}]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 1 and len(body["results"]) == 2
    assert body["results"][0]["label"] in ("neg", "pos") and abs(sum(body["results"][0]["scores"].values()) - 1) < 1e-5
    score = post(app, "/enc/v1/classify", {"adapter": "public/score", "inputs": ["ok"]}).json()
    assert isinstance(score["results"][0]["value"], float)


def test_completions_and_chat(app):
    r = post(
        app,
        "/lm/v1/completions",
        {"model": "acme/writer", "prompt": ["a gripping", "the plot"], "max_tokens": 5, "temperature": 0},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and len(body["choices"]) == 2
    assert body["usage"]["completion_tokens"] <= 10
    bare = post(app, "/lm/v1/completions", {"model": "llama", "prompt": "a gripping", "max_tokens": 3})
    assert bare.status_code == 200, bare.text
    chat = post(
        app,
        "/lm/v1/chat/completions",
        {"model": "acme/writer", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.parametrize(
    "path,body,headers,status",
    [
        ("/enc/v1/classify", {"adapter": "acme/sentiment", "inputs": ["x"]}, {}, 401),
        (
            "/enc/v1/classify",
            {"adapter": "acme/sentiment", "inputs": ["x"]},
            {"Authorization": "Bearer wrong-key-000000000"},
            401,
        ),
        ("/enc/v1/classify", {"adapter": "globex/topic", "inputs": ["x"]}, ACME, 403),
        ("/enc/v1/classify", {"adapter": "acme/nope", "inputs": ["x"]}, ACME, 404),
        ("/enc/v1/classify", {"adapter": "acme/../etc", "inputs": ["x"]}, ACME, 400),
        ("/enc/v1/classify", {"adapter": "acme/sentiment", "inputs": ["x"] * 9}, ACME, 413),
        ("/enc/v1/classify", {"adapter": "acme/sentiment", "inputs": ["x" * 600]}, ACME, 413),
        ("/enc/v1/classify", {"adapter": "acme/sentiment", "inputs": ["x" * 30_000]}, ACME, 413),
        ("/enc/v1/classify", {"adapter": "acme/sentiment"}, ACME, 400),
        ("/enc/v1/classify", {"adapter": "acme/sentiment", "inputs": ["a " * 240]}, ACME, 400),
        ("/enc/v1/completions", {"model": "acme/sentiment", "prompt": "x"}, ACME, 400),
        ("/lm/v1/completions", {"model": "acme/writer", "prompt": "x", "best_of": 2}, ACME, 400),
        ("/lm/v1/completions", {"model": "gpt-4o", "prompt": "x"}, ACME, 404),
    ],
)
def test_bad_requests_get_clear_4xx(app, path, body, headers, status):
    r = post(app, path, body, headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"].endswith("_error") and error["request_id"] == r.headers["x-request-id"]
    for leak in ("Traceback", "RayTaskError", "pid=", "ip=", "\x1b[", "/tmp/", "actor"):
        assert leak not in r.text, leak


def logs_holding(text: str) -> list[str]:
    """This Ray session's log files (Serve's access logs, the replicas' output) holding `text`."""
    import ray

    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    return [str(path.relative_to(logs)) for path in logs.rglob("*")
            if path.is_file() and text in path.read_text(errors="replace")]


@pytest.mark.parametrize("given, kept", [
    (["trace-0123456789abcdef"], True),
    (["two words"], False),  # not a plain token
    (["x" * 129], False),  # over 128 characters
    (["first-0001", "second-0001"], False),  # two ids
], ids=["valid", "space", "long", "two"])
def test_one_request_id_in_the_header_the_body_and_the_logs_through_serves_proxy(app, given, kept):
    """Serve's proxy answers with the x-request-id it passed on: an invalid one is replaced before it."""
    headers = [*ACME.items(), *(("x-request-id", value) for value in given)]
    refused = httpx.post(f"{app['base']}/enc/v1/classify", json={"adapter": "acme/nope", "inputs": ["x"]},
                         headers=headers, timeout=60)
    assert refused.status_code == 404
    (header,) = refused.headers.get_list("x-request-id")
    assert refused.json()["error"]["request_id"] == header
    assert header == given[0] if kept else header.startswith("req-")

    def logged() -> bool:  # the edge's refusal line, and Serve's own access log line of the proxy
        return bool(logs_holding(f"request {header}: 404 model_not_found")) and any(
            name.startswith("serve/proxy_") for name in logs_holding(header))

    deadline = time.monotonic() + 30  # log files are written as the lines come
    while not logged() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert logged()
    if not kept:
        assert all(logs_holding(value) == [] for value in given)


def test_a_bad_tenant_in_the_batch_fails_no_good_request(app):
    """Rounds of 12 good acme requests sent together with bad globex ones (over the context,
    an unknown adapter): the Serve batcher mixes them, and only the bad ones fail."""
    good_body = {"adapter": "acme/sentiment", "inputs": ["a fine film"]}
    alone = post(app, "/enc/v1/classify", good_body).json()["results"]
    bad_bodies = [{"adapter": "globex/topic", "inputs": ["a " * 240]}, {"adapter": "globex/nope", "inputs": ["x"]}]
    answers: list[tuple[bool, httpx.Response]] = []

    def send(body, headers, good):
        answers.append((good, post(app, "/enc/v1/classify", body, headers)))

    for _ in range(5):
        jobs = [(good_body, ACME, True)] * 12 + [(b, GLOBEX, False) for b in bad_bodies]
        threads = [threading.Thread(target=send, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    good = [r for ok, r in answers if ok]
    bad = [r for ok, r in answers if not ok]
    print(f"isolation over HTTP: {sum(r.status_code == 200 for r in good)}/{len(good)} good answered, "
          f"{sum(400 <= r.status_code < 500 for r in bad)}/{len(bad)} bad refused")
    assert [r.status_code for r in good] == [200] * 60
    for r in good:
        same_results(r.json()["results"], alone)
    assert sorted({r.status_code for r in bad}) == [400, 404]


def test_tenants_see_only_their_own_and_public(app):
    ids = {m["id"] for m in httpx.get(f"{app['base']}/enc/v1/models", headers=GLOBEX).json()["data"]}
    assert "globex/topic" in ids and "public/score" in ids and "acme/sentiment" not in ids
    assert post(app, "/enc/v1/adapters/acme/sentiment/unload", {}, GLOBEX).status_code == 403
    assert httpx.get(f"{app['base']}/enc/metrics", headers=GLOBEX).status_code == 403


def test_load_unload_reload(app):
    r = post(app, "/enc/v1/adapters/acme/sentiment/load", {"pin": True})
    assert r.status_code == 200 and r.json()["version"] >= 1
    assert post(app, "/enc/v1/adapters/acme/sentiment/unload", {}).json()["unloaded"] is True
    assert post(app, "/enc/v1/classify", {"adapter": "acme/sentiment", "inputs": ["x"]}).status_code == 200
    assert post(app, "/enc/v1/adapters/acme/sentiment/reload", {}).status_code == 200


def test_mixed_batches_and_metrics_move(app):
    before = metrics(app) | engine_metrics()
    targets = [("acme/sentiment", ACME), ("globex/topic", GLOBEX), ("public/score", ACME)] * 8
    results = []

    def send(adapter, headers):
        results.append(post(app, "/enc/v1/classify", {"adapter": adapter, "inputs": ["fine"]}, headers).status_code)

    threads = [threading.Thread(target=send, args=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * len(targets)
    after = metrics(app) | engine_metrics()
    assert total(after, "dcft_requests_total", route="classify", status="200") >= total(
        before, "dcft_requests_total", route="classify", status="200"
    ) + len(targets)
    batches = total(after, "dcft_batch_size_count") - total(before, "dcft_batch_size_count")
    assert 1 <= batches < len(targets), "concurrent requests must share forward passes"
    distinct = total(after, "dcft_batch_distinct_adapters_sum") - total(before, "dcft_batch_distinct_adapters_sum")
    assert distinct > batches, "some batch must mix different adapters"
    assert total(after, "dcft_bank_resident_adapters", tier="device") >= 3
    assert total(after, "dcft_adapter_load_seconds_count") >= 1


def test_every_replica_exports_its_series_on_rays_port(app):
    """Ray's metrics port carries the Ingress replica's edge series and the AdapterModel
    replica's engine series as ray_dcft_*, tagged application, deployment and replica; once
    Ray's export period has passed, the edge counts there equal the replica's own /metrics."""
    assert post(app, "/enc/v1/classify", {"adapter": "acme/sentiment", "inputs": ["exported"]}).status_code == 200
    own = metrics(app)
    (scope,) = [dict(ls) for n, ls in own if n == "dcft_metrics_scope"]
    served = total(own, "dcft_requests_total")
    deadline, samples = time.monotonic() + 90, []
    while time.monotonic() < deadline:  # Ray exports on its own period (seconds)
        samples = [s for s in ray_samples() if s.name.startswith("ray_dcft_") and s.labels.get("application") == "enc"]
        edge = sum(s.value for s in samples if s.name == "ray_dcft_requests_total")
        if edge >= served and any(s.name == "ray_dcft_batch_size_count" for s in samples):
            break
        time.sleep(0.5)
    by_name = {}
    for sample in samples:
        by_name.setdefault(sample.name, []).append(sample)
    assert sum(s.value for s in by_name["ray_dcft_requests_total"]) == served
    for name in ("ray_dcft_requests_total", "ray_dcft_request_latency_seconds_bucket", "ray_dcft_http_responses_total",
                 "ray_dcft_queue_depth"):
        assert {(s.labels["deployment"], s.labels["replica"]) for s in by_name[name]} == {("Ingress", scope["replica"])}
    engine = by_name["ray_dcft_batch_size_count"]
    assert engine[0].labels["deployment"] == "AdapterModel" and engine[0].labels["replica"]
    assert sum(s.value for s in engine) >= 1


def test_hot_swap_under_traffic_fails_no_request(app):
    stop, statuses, versions = threading.Event(), [], set()

    def traffic():
        while not stop.is_set():
            r = post(app, "/enc/v1/classify", {"adapter": "acme/sentiment", "inputs": ["swap me"]})
            statuses.append(r.status_code)
            if r.status_code == 200:
                versions.add(r.json()["version"])

    workers = [threading.Thread(target=traffic) for _ in range(4)]
    for w in workers:
        w.start()
    new = random_adapter(app["bert"], app["root"] / "s1v2", "seq_cls", seed=42, kernel=4)
    published = app["enc_hub"].publish(new, "acme/sentiment")
    deadline = time.monotonic() + 60
    while published.version not in versions and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    for w in workers:
        w.join()
    assert published.version in versions, "the watcher must pick up the new version"
    assert statuses and set(statuses) == {200}


def test_killed_replica_under_load_recovers_and_reloads_from_the_registry(app):
    import ray

    body = {"adapter": "globex/topic", "inputs": ["a plot", "a twist"]}
    reference = post(app, "/enc/v1/classify", body, GLOBEX).json()["results"]
    replica = next(
        actor for actor in ray.util.list_named_actors(all_namespaces=True) if "enc#AdapterModel" in actor["name"]
    )
    stop, answers = threading.Event(), []

    def traffic():
        while not stop.is_set():
            r = post(app, "/enc/v1/classify", body, GLOBEX)
            answers.append((time.monotonic(), r.status_code, r.json()))

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for w in workers:
        w.start()
    deadline = time.monotonic() + 60
    while len(answers) < 3 and time.monotonic() < deadline:  # traffic is flowing before the kill
        time.sleep(0.05)
    killed_at = time.monotonic()
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    deadline = killed_at + 180
    while time.monotonic() < deadline and not any(t > killed_at + 2 and s == 200 for t, s, _ in answers):
        time.sleep(0.2)
    stop.set()
    for w in workers:
        w.join()

    statuses = {s for _, s, _ in answers}
    back = min((t - killed_at for t, s, _ in answers if t > killed_at + 2 and s == 200), default=float("nan"))
    counts = {code: sum(s == code for _, s, _ in answers) for code in sorted(statuses)}
    print(f"fault replica killed under load: answers {counts}, first answer 2+ s after the kill at {back:.1f} s")
    assert statuses <= {200, 503}, f"only answers or clean retry-later errors, got {statuses}"
    assert any(t > killed_at + 2 and s == 200 for t, s, _ in answers), "the replica never came back"
    for _, status, payload in answers:
        if status == 200:
            same_results(payload["results"], reference)
        else:
            assert payload["error"]["type"] == "server_error"
    # The new replica starts empty: the adapter came back from the registry, unchanged.
    same_results(post(app, "/enc/v1/classify", body, GLOBEX).json()["results"], reference)


def test_slow_and_dropped_clients_hold_nothing(app):
    """Clients that trickle a body, or hang up mid-request, neither block others nor leak in-flight slots."""
    host, port = app["base"].removeprefix("http://").split(":")
    body = json.dumps({"adapter": "acme/sentiment", "inputs": ["dropped"]}).encode()
    head = (f"POST /enc/v1/classify HTTP/1.1\r\nHost: {host}\r\nAuthorization: {ACME['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    slow = [socket.create_connection((host, int(port))) for _ in range(16)]
    for sock in slow:
        sock.sendall(head + body[:5])  # then nothing more: the body never completes
    for _ in range(8):  # hang up right after sending a whole request
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + body)
    start = time.monotonic()
    answer = post(app, "/enc/v1/classify", {"adapter": "acme/sentiment", "inputs": ["still served"]})
    assert answer.status_code == 200 and time.monotonic() - start < 30
    for sock in slow:
        sock.close()
    deadline = time.monotonic() + 30
    while total(metrics(app), "dcft_queue_depth") != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert total(metrics(app), "dcft_queue_depth") == 0


# --- the official OpenAI client ---------------------------------------------------------


def openai_client(app, tenant: str = "acme"):
    openai = pytest.importorskip("openai")
    # No retries: each call must show the server's own first answer.
    return openai.OpenAI(base_url=f"{app['base']}/lm/v1", api_key=KEY_OF[tenant], max_retries=0, timeout=60)


def test_openai_client_completions_and_chat(app):
    client = openai_client(app)
    done = client.completions.create(model="acme/writer", prompt="a gripping", max_tokens=4, temperature=0)
    assert done.object == "text_completion" and done.usage.completion_tokens <= 4
    again = client.completions.create(model="acme/writer", prompt="a gripping", max_tokens=4, temperature=0)
    assert again.choices[0].text == done.choices[0].text
    chat = client.chat.completions.create(model="acme/writer", max_completion_tokens=4,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.role == "assistant" and chat.usage.prompt_tokens > 1
    assert {m.id for m in client.models.list()} >= {"llama", "acme/writer"}


def test_openai_client_chat_shapes_and_model_cards(app):
    """The message shapes OpenAI's client sends that were refused before, and `models.retrieve`."""
    openai = pytest.importorskip("openai")
    client = openai_client(app)
    shapes = [
        [{"role": "user", "content": [{"type": "text", "text": "a gripping"}, {"type": "text", "text": "film"}]}],
        [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi", "name": "ann"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}, {"role": "user", "content": "a"}],
    ]
    for messages in shapes:
        # Greedy, so the answer is the same every run; a random model may stop at once, so
        # what is checked is that the shape was accepted and its prompt counted.
        answer = client.chat.completions.create(model="acme/writer", messages=messages, max_tokens=3,
                                                temperature=0)
        choice = answer.choices[0]
        assert choice.message.role == "assistant" and choice.finish_reason in {"stop", "length"}
        assert answer.usage.prompt_tokens > 1 and answer.usage.completion_tokens <= 3
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="acme/writer", max_tokens=3, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,x"}}]}])
    assert caught.value.body["param"] == "messages.0.content"
    card = client.models.retrieve("acme/writer")
    assert card.id == "acme/writer" and card.created > 1_600_000_000 and card.owned_by == "acme"
    assert client.models.retrieve("llama").created > 1_600_000_000
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("acme/nope")


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_openai_client_streams_what_it_would_get_whole(app, route):
    client = openai_client(app)
    common = dict(model="acme/writer", max_tokens=12, temperature=0, n=2)
    if route == "completions":
        whole = client.completions.create(prompt="a gripping", **common)
        chunks = list(client.completions.create(prompt="a gripping", stream=True,
                                                stream_options={"include_usage": True}, **common))
        texts = {i: "".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i)
                 for i in (0, 1)}
        want = {c.index: c.text for c in whole.choices}
    else:
        messages = [{"role": "user", "content": "a gripping"}]
        whole = client.chat.completions.create(messages=messages, **common)
        chunks = list(client.chat.completions.create(messages=messages, stream=True,
                                                     stream_options={"include_usage": True}, **common))
        texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks
                            if c.choices and c.choices[0].index == i) for i in (0, 1)}
        want = {c.index: c.message.content for c in whole.choices}
    assert texts == want and len(chunks) > 3
    streamed, counted = chunks[-1].usage, whole.usage  # one tally counts both (a prompt once for its n)
    assert (streamed.prompt_tokens, streamed.completion_tokens, streamed.total_tokens) == \
        (counted.prompt_tokens, counted.completion_tokens, counted.total_tokens)


def test_openai_client_logprobs(app):
    client = openai_client(app)
    done = client.chat.completions.create(model="acme/writer", messages=[{"role": "user", "content": "film"}],
                                          max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = done.choices[0].logprobs.content
    assert len(content) == done.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob == pytest.approx(c.top_logprobs[0].logprob) for c in content)  # greedy: the top token


def test_a_client_hanging_up_mid_stream_frees_its_row_on_the_replica(app):
    """Through Ray: the ingress closes the stream, Serve cancels the replica's generator, and
    the decoder drops the row within a step (the admin status counts running sequences)."""
    def status() -> dict:
        return httpx.get(f"{app['base']}/lm/v1/admin/status", headers=ADMIN, timeout=30).json()

    body = {"model": "acme/writer", "prompt": "once upon", "max_tokens": 110, "temperature": 0, "stream": True}
    steps = status()["decode_steps"]
    with httpx.stream("POST", f"{app['base']}/lm/v1/completions", json=body, headers=ACME, timeout=60) as answer:
        assert answer.status_code == 200
        next(answer.iter_lines())  # the first chunk: the generation runs
    deadline, now = time.monotonic() + 30, status()
    while now["running_sequences"] != 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        now = status()
    assert now["running_sequences"] == 0
    assert now["decode_steps"] - steps < 109, "the generation must stop before its 110 tokens"


def test_a_client_hanging_up_on_a_completion_counts_as_499_never_5xx(app):
    """A whole request sent, and the connection closed while its 8 choices decode: Serve's proxy
    cancels the request at the Ingress, which counts it as 499 (the 5xx alert reads none of it)."""
    def counted() -> dict[str, float]:
        samples = metrics(app, "/lm")
        return {status: total(samples, "dcft_http_responses_total", route="/v1/completions", status=status)
                for status in ("200", "499", "500", "503", "504")}

    def running() -> int:
        return httpx.get(f"{app['base']}/lm/v1/admin/status", headers=ADMIN, timeout=30).json()["running_sequences"]

    before = counted()
    body = json.dumps({"model": "acme/writer", "prompt": "once upon", "max_tokens": 110, "n": 8,
                       "logit_bias": {"3": -100}}).encode()  # </s> biased away: each choice decodes 110 tokens
    host, port = app["base"].removeprefix("http://").split(":")
    head = (f"POST /lm/v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: {ACME['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body)
        deadline, seen = time.monotonic() + 30, 0
        while seen < 8 and time.monotonic() < deadline:
            seen = running()
        assert seen == 8  # it decodes when the client hangs up
    deadline = time.monotonic() + 30
    while counted()["499"] == before["499"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert counted() == before | {"499": before["499"] + 1}


def test_openai_client_errors_are_typed_and_readable(app):
    openai = pytest.importorskip("openai")
    client = openai_client(app)
    cases = [
        (openai.BadRequestError, dict(model="acme/writer", prompt="x", temperature=-1), "temperature"),
        (openai.BadRequestError, dict(model="acme/writer", prompt="x", max_tokens=0), "max_tokens"),
        (openai.BadRequestError, dict(model="acme/writer", prompt="x", best_of=2), "best_of"),
        (openai.BadRequestError, dict(model="acme/writer", prompt="x", echo=True), "echo"),
        (openai.BadRequestError, dict(model="acme/writer", prompt="x", n=99), "n"),
        (openai.BadRequestError, dict(model="acme/writer", prompt="x", stream=True, logprobs=21), "logprobs"),
        (openai.BadRequestError, dict(model="acme/writer", prompt="ぁ" * 150, max_tokens=2), "prompt"),
        (openai.NotFoundError, dict(model="gpt-4o", prompt="x"), "model"),
        (openai.NotFoundError, dict(model="acme/nope", prompt="x"), "model"),
    ]
    for expected, kwargs, param in cases:
        with pytest.raises(expected) as caught:
            client.completions.create(**kwargs)
        err = caught.value
        assert err.param == param and err.type in ("invalid_request_error", "not_found_error"), kwargs
        readable(err)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="acme/writer", messages=[{"role": "tool", "content": "x",
                                                                       "tool_call_id": "t"}])
    readable(caught.value)
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=f"{app['base']}/lm/v1", api_key="wrong-key-000000000000", max_retries=0).models.list()
    readable(caught.value)
    with pytest.raises(openai.PermissionDeniedError) as caught:
        openai_client(app, "globex").completions.create(model="acme/writer", prompt="x", max_tokens=2)
    readable(caught.value)


def test_openai_client_sees_429_over_the_tenant_quota(app):
    openai = pytest.importorskip("openai")
    client = openai_client(app, "initech")
    client.completions.create(model="llama", prompt="x", max_tokens=2)  # the burst of one
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="llama", prompt="x", max_tokens=2)
    assert int(caught.value.response.headers["retry-after"]) >= 1
    readable(caught.value)
    assert openai_client(app).completions.create(model="llama", prompt="x", max_tokens=2).choices


def readable(err) -> None:
    """The exception text is our one-line message: no trace, host, pid or path."""
    text = str(err)
    assert err.body["message"] in text and err.body["request_id"]
    for leak in ("Traceback", "RayTaskError", "pid=", "ip=", "\x1b[", "/tmp/", "actor", "File \""):
        assert leak not in text, (leak, text)


# --- a real Prometheus scrapes the app --------------------------------------------------


def test_a_real_prometheus_scrapes_rays_port_and_answers_the_dashboards_query(app, tmp_path):
    """Bounded: Prometheus on 127.0.0.1 scrapes Ray's metrics export port every second, as the
    shipped config does (with the shipped alert rules loaded); the dashboard's request series,
    summed over replicas, must come back through its query API within a minute."""
    import shutil
    import subprocess

    import ray

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus (Debian package `prometheus`) not installed")
    assert post(app, "/enc/v1/classify", {"adapter": "acme/sentiment", "inputs": ["scraped"]}).status_code == 200
    shutil.copy(Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules.yml", tmp_path / "rules.yml")
    target = f"127.0.0.1:{ray.nodes()[0]['MetricsExportPort']}"
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [rules.yml]\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        f"    static_configs: [{{targets: ['{target}']}}]\n"
    )
    query = 'sum by (route, status) (ray_dcft_requests_total{application="enc",route="classify",status="200"})'
    port = free_port()
    server = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline, found = time.monotonic() + 60, []
        while not found and time.monotonic() < deadline:
            try:
                answer = httpx.get(f"http://127.0.0.1:{port}/api/v1/query",
                                   params={"query": query}, timeout=5)
                found = answer.json()["data"]["result"] if answer.status_code == 200 else []
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        groups = httpx.get(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5).json()["data"]["groups"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert found and float(found[0]["value"][1]) >= 1
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) >= 6 and not [r for r in rules if r["health"] == "err"], rules
