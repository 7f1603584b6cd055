"""Two `dcft serve` processes for two backbones on one running Ray cluster (the runbook's shape):
both answer; a third whose app name, route prefix or port clashes is refused with a message and
changes nothing; and a process that stops takes only its own app down."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from adapters.store.hub import AdapterHub
from benchmarks.fixtures import random_adapter, tiny_bert_dir, tiny_llama_dir
from benchmarks.harness import free_port

pytestmark = pytest.mark.timeout(420)
RAY, DCFT = Path(sys.executable).with_name("ray"), Path(sys.executable).with_name("dcft")


def ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(check, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout_s:.0f} s")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head on 127.0.0.1 that no test process owns, as an operator would start it."""
    pytest.importorskip("ray")
    root = tmp_path_factory.mktemp("shared")
    gcs = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([str(RAY), "start", "--head", "--port", str(gcs), "--num-cpus", "2", "--include-dashboard",
                    "false", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        yield root, {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)


def serve(env: dict, model: Path, hub: AdapterHub, port: int, *flags: str) -> subprocess.Popen:
    command = [str(DCFT), "serve", "--model", str(model), "--hub", hub.url, "--port",
               str(port), "--kernel-size", "4", *flags]
    root = Path(__file__).resolve().parents[2]
    return subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_backbones_share_a_cluster_and_a_clash_is_refused_changing_nothing(cluster):
    root, env = cluster
    bert, llama = tiny_bert_dir(root / "bert"), tiny_llama_dir(root / "llama")
    enc_hub, lm_hub = AdapterHub(str(root / "hub-enc")), AdapterHub(str(root / "hub-lm"))
    enc_hub.publish(random_adapter(bert, root / "s1", "seq_cls", seed=1, kernel=4), "acme/sentiment")
    lm_hub.publish(random_adapter(llama, root / "l1", "causal_lm", seed=4, kernel=4), "acme/writer")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    first = serve(env, bert, enc_hub, port)
    wait_for(lambda: ready(f"{base}/readyz"), 240, "the first app")
    second = serve(env, llama, lm_hub, port, "--route-prefix", "/lm")
    wait_for(lambda: ready(f"{base}/lm/readyz"), 240, "the second app")
    try:
        clashes = {  # the clash -> what its message must say
            ("--route-prefix", "/again"): "already runs",  # the same backbone: the same app name
            ("--route-prefix", "/lm", "--app-name", "other"): "is taken by the app",
            ("--route-prefix", "/third", "--app-name", "third", "--port", str(free_port())): "listens on port",
        }
        for flags, message in clashes.items():
            refused = serve(env, bert, enc_hub, port, *flags)
            try:
                output, _ = refused.communicate(timeout=120)
            finally:
                if refused.poll() is None:  # not refused: stopping it deletes the app it made
                    refused.terminate()
                    refused.communicate(timeout=120)
            assert refused.returncode != 0 and message in output, output[-2000:]
        classify = httpx.post(f"{base}/v1/classify", json={"adapter": "acme/sentiment", "inputs": ["fine"]},
                              headers={"x-request-id": "two words"}, timeout=60)
        assert classify.status_code == 200, classify.text
        # The first `dcft serve` started Serve on this cluster, with the request-id rule in its proxy.
        assert [header[:4] for header in classify.headers.get_list("x-request-id")] == ["req-"]
        completion = httpx.post(f"{base}/lm/v1/completions", timeout=60,
                                json={"model": "acme/writer", "prompt": "a film", "max_tokens": 2})
        assert completion.status_code == 200, completion.text
        second.terminate()  # stopping one process takes down its own app only
        second.wait(timeout=120)
        wait_for(lambda: not ready(f"{base}/lm/readyz"), 60, "the second app's removal")
        assert ready(f"{base}/readyz")
    finally:
        for process in (first, second):
            if process.poll() is None:
                process.terminate()
                process.wait(timeout=120)
