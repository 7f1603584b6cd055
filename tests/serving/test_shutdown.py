"""SIGTERM to a `dcft serve` process (its own Ray cluster, the real Serve app on 127.0.0.1): the
streams it runs finish whole, a request sent during the drain gets 503 + Retry-After, and the
process exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_llama_dir
from benchmarks.harness import free_port

pytestmark = pytest.mark.timeout(300)
DCFT = Path(sys.executable).with_name("dcft")
TOKENS = 800  # about 7 s of tiny-Llama decoding through Serve on 2 CPU cores: the drain happens mid-stream
EOS_ID = "3"  # the tiny tokenizer's </s>: biased away so each stream runs to its max_tokens


def wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout_s:.0f} s")
        time.sleep(0.05)


def answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def server(tmp_path):
    """`dcft serve` for a tiny Llama of 1024 positions, allowed streams of TOKENS tokens."""
    pytest.importorskip("ray")
    llama = tiny_llama_dir(tmp_path / "llama", context=1024)
    hub = AdapterHub(str(tmp_path / "hub"))
    hub.publish(random_adapter(llama, tmp_path / "w", "causal_lm", seed=4, kernel=4), "acme/writer")
    config = tmp_path / "serve.json"
    config.write_text(json.dumps({"limits": {"max_new_tokens": TOKENS}}))
    port = free_port()
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}  # a cluster of its own
    env["RAY_AUTH_MODE"] = "disabled"
    command = [str(DCFT), "serve", "--model", str(llama), "--hub", hub.url, "--port", str(port), "--kernel-size", "4",
               "--config", str(config)]
    process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[2], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    output: list[str] = []  # read as it comes: the process says when it is wholly up
    threading.Thread(target=lambda: output.extend(iter(process.stdout.readline, "")), daemon=True).start()
    try:
        # Ready once the app answers and the process has finished starting (the fine-tuning
        # scheduler deploys after the app; a SIGTERM before that drains only once it is up).
        wait_for(lambda: process.poll() is not None or (answers(f"{base}/readyz") and
                                                        any("to stop" in line for line in output)), 180, "the app")
        assert process.poll() is None, "".join(output)[-3000:]
        yield process, base, output
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=60)


class Stream(threading.Thread):
    """One streamed completion, read as it comes: its lines, and when its first and last arrived."""

    def __init__(self, base: str):
        super().__init__(daemon=True)
        self.base, self.lines = base, []
        self.first_at = self.done_at = None

    def run(self) -> None:
        body = {"model": "acme/writer", "prompt": "once upon", "max_tokens": TOKENS, "temperature": 0,
                "stream": True, "logit_bias": {EOS_ID: -100}}
        with httpx.stream("POST", f"{self.base}/v1/completions", json=body, timeout=120) as response:
            for line in response.iter_lines():
                if line:
                    self.lines.append(line.removeprefix("data: "))
                    self.first_at = self.first_at or time.monotonic()
        self.done_at = time.monotonic()


def test_sigterm_during_four_streams_lets_them_finish_refuses_new_requests_and_exits_0(server):
    process, base, output = server
    streams = [Stream(base) for _ in range(4)]
    for stream in streams:
        stream.start()
    wait_for(lambda: all(stream.first_at for stream in streams), 60, "every stream's first token")
    process.send_signal(signal.SIGTERM)

    def refused() -> httpx.Response | None:
        answer = httpx.post(f"{base}/v1/completions", json={"model": "acme/writer", "prompt": "x", "max_tokens": 2},
                            timeout=30)
        return answer if answer.status_code == 503 else None

    wait_for(lambda: refused() is not None, 20, "a 503 for a new request")
    refused_at, late = time.monotonic(), refused()
    assert late.headers["retry-after"] and late.headers["x-request-id"] == late.json()["error"]["request_id"]
    assert late.json()["error"]["code"] == "shutting_down"
    for stream in streams:
        stream.join(timeout=60)
        assert stream.lines[-1] == "[DONE]", stream.lines[-3:]
        chunks = [json.loads(line) for line in stream.lines[:-1]]
        assert all("error" not in chunk for chunk in chunks)
        assert len(chunks) == TOKENS and chunks[-1]["choices"][0]["finish_reason"] == "length"  # the whole text
        assert stream.done_at > refused_at  # it still ran while the drain refused new requests
    assert process.wait(timeout=90) == 0
    wait_for(lambda: any("drained" in line for line in output), 10, "the drain's report")
    text = "".join(output)
    assert "app llama: drained" in text and "ended at the drain bound" not in text, text[-3000:]
