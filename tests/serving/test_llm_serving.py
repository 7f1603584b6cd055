"""LLM serving: continuous batching across adapters, streaming, cancellation, and the
OpenAI sampling parameters, on a tiny random Llama (in-process, no Ray).

The reference for every continuous-batching answer is the same call decoded alone by the
static batcher: greedy tokens must be identical.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient

from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_llama_dir
from serving.api.app import create_app
from serving.api.auth import KeyRing
from serving.backend import LocalBackend
from serving.calls import GenerateCall
from serving.config import EngineConfig, LimitsConfig
from serving.decoder import DecodeRequest
from serving.errors import OverloadedError
from serving.rows import Sampling
from serving.service import ModelService

KEY = "acme-key-0123456789abcdef"
HEADERS = {"Authorization": f"Bearer {KEY}"}
WORDS = ["a", "the plot", "gripping", "once upon", "film", "dull"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    model_dir = tiny_llama_dir(root / "llama")
    hub = AdapterHub(str(root / "hub"))
    for seed, name in enumerate(["acme/writer", "globex/writer"]):
        hub.publish(random_adapter(model_dir, root / name.replace("/", "-"), "causal_lm", seed=4 + seed, kernel=4,
                                   scale=0.5), name)
    return model_dir, hub


def service(llama, **engine) -> ModelService:
    model_dir, hub = llama
    return ModelService(EngineConfig(model=str(model_dir), hub=hub.url, kernel_size=4, **engine))


@pytest.fixture(scope="module")
def static(llama):
    return service(llama, batching="static")


@pytest.fixture(scope="module")
def continuous(llama):
    decoding = service(llama, max_running=3, kv_cache_len=40)  # few rows and a short cache: queueing, rows reused
    yield decoding
    decoding.close()


def run(coroutine):
    return asyncio.run(coroutine)


def random_calls(count: int, seed: int) -> list[GenerateCall]:
    rng = random.Random(seed)
    calls = []
    for _ in range(count):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        adapter = rng.choice(["acme/writer", "globex/writer", None])
        calls.append(GenerateCall(adapter, (prompt,), sampling=Sampling(max_tokens=rng.randint(2, 24))))
    return calls


def test_requests_joining_a_running_batch_decode_as_they_do_alone(continuous, static):
    """12 calls over 3 rows, arriving 10 ms apart with mixed adapters: they queue, join at
    step boundaries, leave as they finish, and later calls reuse the rows they free; every answer
    is unchanged."""
    calls = random_calls(12, seed=0)

    async def staggered():
        async def one(call, delay):
            await asyncio.sleep(delay)
            return await continuous.complete(call)

        return await asyncio.gather(*(one(call, 0.01 * i) for i, call in enumerate(calls)))

    steps = continuous.engine.decoder.steps
    results = run(staggered())
    for call, result in zip(calls, results, strict=True):
        alone = static.generate(call)
        assert [g.tokens for g in result.generations] == [g.tokens for g in alone.generations], call
        assert result.generations[0].finish_reason == alone.generations[0].finish_reason
    made = sum(c.sampling.max_tokens for c in calls)
    assert continuous.engine.decoder.steps - steps < made, "rows must share decode steps"
    assert sum(c.sampling.max_tokens for c in calls) > 40, "rows must have been reused by later calls"


def test_two_adapters_in_one_running_batch(continuous, static):
    calls = [GenerateCall("acme/writer", ("a gripping",), sampling=Sampling(max_tokens=12)),
             GenerateCall("globex/writer", ("a gripping",), sampling=Sampling(max_tokens=12))]

    async def together():
        return await asyncio.gather(*(continuous.complete(call) for call in calls))

    mixed = run(together())
    alone = [static.generate(call) for call in calls]
    assert [m.generations[0].tokens for m in mixed] == [a.generations[0].tokens for a in alone]
    assert mixed[0].generations[0].tokens != mixed[1].generations[0].tokens, "adapters must change the tokens"


def test_n_choices_and_seeded_sampling(continuous, static):
    seeded = GenerateCall("acme/writer", ("once upon",), n=2, sampling=Sampling(max_tokens=10, temperature=1.0, seed=3))
    first, second = run(continuous.complete(seeded)), run(continuous.complete(seeded))
    assert [g.tokens for g in first.generations] == [g.tokens for g in second.generations]
    assert first.generations[0].tokens != first.generations[1].tokens, "the n choices of a seeded call differ"
    assert [g.tokens for g in first.generations] == [g.tokens for g in static.generate(seeded).generations]


def test_logprobs_penalties_and_logit_bias(continuous):
    greedy = run(continuous.complete(GenerateCall(None, ("film",), sampling=Sampling(max_tokens=8, logprobs=3))))
    chosen = greedy.generations[0].logprobs
    assert len(chosen) == len(greedy.generations[0].tokens) == 8
    for lp in chosen:  # greedy picks the most likely token: its logprob is the top one
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token and lp.logprob == pytest.approx(lp.top[0][1])
        assert lp.logprob <= 0 and lp.text == continuous.engine.tokenizer.decode([lp.token])
    repeating = GenerateCall("acme/writer", ("x y z",), sampling=Sampling(max_tokens=8))
    plain = run(continuous.complete(repeating)).generations[0].tokens
    assert len(set(plain)) < len(plain), "this adapter repeats itself greedily"
    penalised = run(continuous.complete(replace(repeating, sampling=Sampling(
        max_tokens=8, frequency_penalty=2.0, presence_penalty=2.0))))
    assert len(set(penalised.generations[0].tokens)) > len(set(plain))
    biased = run(continuous.complete(GenerateCall(None, ("film",), sampling=Sampling(
        max_tokens=5, logit_bias=((42, 100.0),)))))
    assert biased.generations[0].tokens == [42] * 5


LONG_PROMPT = " ".join(WORDS * 2)  # 54 tokens (byte-level): seven 8-token chunks


def test_a_long_prompt_prefilled_in_chunks_decodes_as_it_does_whole(llama, static):
    chunked = service(llama, max_running=2, kv_cache_len=128, prefill_chunk_tokens=8)
    try:
        for adapter in ("acme/writer", None):
            call = GenerateCall(adapter, (LONG_PROMPT,), sampling=Sampling(max_tokens=10))
            assert len(chunked.engine.encode_prompt(LONG_PROMPT, None, call.sampling).prompt_ids) > 4 * 8
            got = run(chunked.complete(call)).generations[0]
            want = static.generate(call).generations[0]
            assert (got.tokens, got.prompt_tokens) == (want.tokens, want.prompt_tokens), adapter
    finally:
        chunked.close()


def test_running_rows_keep_decoding_while_a_long_prompt_prefills(llama):
    """Each chunk of the long prompt sits between two decode steps of the running row, so the
    running row gets a token per chunk rather than waiting for the whole prefill."""
    decoding = service(llama, max_running=2, kv_cache_len=128, prefill_chunk_tokens=8)
    engine, decoder = decoding.engine, decoding.engine.decoder
    short = engine.encode_prompt("once upon", engine.resolve("acme/writer"), Sampling(max_tokens=60))
    long = engine.encode_prompt(LONG_PROMPT, engine.resolve("globex/writer"), Sampling(max_tokens=1))
    chunks = -(-len(long.prompt_ids) // 8)
    first_token_at: list[int] = []  # the decode step count when the long prompt's first token came out
    try:
        decoder.submit(DecodeRequest(short.key, short.prompt_ids, short.sampling, emit=lambda event: None))
        assert wait_until(lambda: decoder.running() == 1)
        submitted_at = decoder.steps
        decoder.submit(DecodeRequest(long.key, long.prompt_ids, long.sampling,
                                     emit=lambda event: first_token_at.append(decoder.steps)))
        assert wait_until(lambda: first_token_at)
    finally:
        decoding.close()
    # One decode step per chunk but the last (give or take the one running while it was submitted).
    assert first_token_at[0] - submitted_at >= chunks - 2, (first_token_at[0] - submitted_at, chunks)


def wait_until(condition, timeout_s: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_stream_closed_early_leaves_the_batch_within_a_step(llama):
    decoding = service(llama, max_running=2, kv_cache_len=128)
    decoder = decoding.engine.decoder
    call = GenerateCall("acme/writer", ("once upon",), sampling=Sampling(max_tokens=100))

    async def read_one_then_leave():
        events = decoding.stream(call)
        first = await anext(events)
        await events.aclose()
        return first

    try:
        assert run(read_one_then_leave()).index == 0
        assert wait_until(lambda: decoder.running() == 0), "the row must leave the running batch"
        steps = decoder.steps
        assert steps < 100
        assert not wait_until(lambda: decoder.steps > steps + 1, timeout_s=0.5), "the decoder must go idle"
    finally:
        decoding.close()


def test_a_full_queue_answers_overloaded_and_tenants_take_turns(llama):
    decoding = service(llama, max_running=1, max_waiting=4, kv_cache_len=128)
    decoder = decoding.engine.decoder
    started: list[str] = []
    long = Sampling(max_tokens=100)

    async def scenario():
        async def one(tenant, prompt):
            call = GenerateCall(None, (prompt,), sampling=long, tenant=tenant)
            async for event in decoding.stream(call):
                if event.prompt_tokens:
                    started.append(tenant)
        async def until(condition):
            deadline = time.monotonic() + 30
            while not condition() and time.monotonic() < deadline:
                await asyncio.sleep(0.002)

        first = asyncio.ensure_future(one("acme", "a"))
        await until(lambda: decoder.running() == 1)  # acme's first request runs; the rest queue behind it
        rest = [asyncio.ensure_future(one(t, p)) for t, p in
                [("acme", "b"), ("acme", "c"), ("acme", "d"), ("globex", "e")]]
        await until(lambda: len(decoder.waiting) == 4)
        with pytest.raises(OverloadedError):
            await anext(decoding.stream(GenerateCall(None, ("f",), sampling=long, tenant="initech")))
        await asyncio.gather(first, *rest)

    try:
        run(scenario())
    finally:
        decoding.close()
    assert started[:2] == ["acme", "globex"], f"globex must not wait behind acme's queue: {started}"


# --- over HTTP (in-process) --------------------------------------------------------------


@pytest.fixture(scope="module")
def client(llama):
    model_dir, hub = llama
    decoding = service(llama)
    limits = LimitsConfig(max_new_tokens=64, request_timeout_s=20)
    with TestClient(create_app(LocalBackend(decoding), KeyRing({KEY: "acme"}), limits, hub, "llama")) as test_client:
        yield test_client
    decoding.close()


def events_of(response) -> list:
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    lines = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_streamed_chunks_assemble_to_the_plain_answer(client, route):
    body = {"model": "acme/writer", "max_tokens": 20, "temperature": 0, "n": 2}
    body |= {"prompt": "a gripping"} if route == "/v1/completions" else {
        "messages": [{"role": "user", "content": "a gripping"}]}
    plain = client.post(route, json=body, headers=HEADERS).json()
    chunks = events_of(client.post(route, json=body | {"stream": True, "stream_options": {"include_usage": True}},
                                   headers=HEADERS))
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage == plain["usage"]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks[:-1] if c["choices"][0]["index"] == index]
        if route == "/v1/completions":
            text, want = "".join(c["text"] for c in mine), plain["choices"][index]["text"]
        else:
            assert mine[0]["delta"]["role"] == "assistant"
            text, want = "".join(c["delta"]["content"] for c in mine), plain["choices"][index]["message"]["content"]
        assert text == want and mine[-1]["finish_reason"] == plain["choices"][index]["finish_reason"]


def test_stop_strings_hold_across_chunk_boundaries(client):
    body = {"model": "llama", "prompt": "the plot", "max_tokens": 24, "temperature": 0}
    full = client.post("/v1/completions", json=body, headers=HEADERS).json()["choices"][0]["text"]
    stop = full[len(full) // 2:][:3]
    assert len(stop) == 3, full
    plain = client.post("/v1/completions", json=body | {"stop": stop}, headers=HEADERS).json()["choices"][0]
    chunks = events_of(client.post("/v1/completions", json=body | {"stop": stop, "stream": True}, headers=HEADERS))
    streamed = "".join(c["choices"][0]["text"] for c in chunks)
    assert streamed == plain["text"] and full.startswith(streamed) and stop not in streamed
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" == plain["finish_reason"]


def test_logprobs_in_both_shapes(client):
    completion = client.post("/v1/completions", headers=HEADERS, json={
        "model": "llama", "prompt": "film", "max_tokens": 4, "temperature": 0, "logprobs": 2}).json()
    found = completion["choices"][0]["logprobs"]
    assert len(found["tokens"]) == len(found["token_logprobs"]) == 4
    # top_logprobs maps token text to logprob: two byte tokens that decode alike share one key
    assert all(1 <= len(top) <= 2 for top in found["top_logprobs"])
    chat = client.post("/v1/chat/completions", headers=HEADERS, json={
        "model": "llama", "messages": [{"role": "user", "content": "film"}], "max_tokens": 4, "temperature": 0,
        "logprobs": True, "top_logprobs": 2}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == 4 and all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 1e-6 for c in content)


def test_a_request_past_its_timeout_answers_504_and_frees_its_row(llama):
    model_dir, hub = llama
    decoding = service(llama)
    # 100 tokens take 30 ms or more here (a step is >= 0.3 ms); the whole generation's bound is ~5 ms
    limits = LimitsConfig(request_timeout_s=0.005, seconds_per_token=1e-6)
    try:
        with TestClient(create_app(LocalBackend(decoding), KeyRing({KEY: "acme"}), limits, hub, "llama")) as slow:
            body = {"model": "llama", "prompt": "once upon", "max_tokens": 100, "logit_bias": {"3": -100}}  # no EOS
            answer = slow.post("/v1/completions", json=body, headers=HEADERS)
            assert answer.status_code == 504, answer.text
            assert wait_until(lambda: decoding.engine.decoder.running() == 0)
            streamed = slow.post("/v1/completions", json=body | {"stream": True}, headers=HEADERS)
            # Past the deadline before the first token: a 504; after it: the error is the last event, then [DONE].
            events = streamed.text.split("\n\n")
            assert streamed.status_code == 504 or ('"code": "timeout"' in events[-3] and events[-2] == "data: [DONE]")
            assert wait_until(lambda: decoding.engine.decoder.running() == 0)
    finally:
        decoding.close()
