"""The fine-tuning loop on the real shipped models, each with the official `openai` client over HTTP on
127.0.0.1:

- MiniLM: the whole path. The Serve app and the scheduler on a local Ray cluster; a text/label file of
  real reviews uploaded, the job validated, trained as a Ray task and published, then `/v1/classify`.
- SmolLM2-135M: the HTTP edge and the real engine in this process (no Ray), and the job's steps called
  here, as the scheduler calls them (`validate_job`, then `run_job`, the task's body): a Serve app and a
  Ray task would each load SmolLM2 once more, which on 2 CPU cores would double this test's time.
"""

import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from adapters.store.job_records import FineTuningConfig
from adapters.store.jobs import JobStore
from benchmarks.harness import free_port, review_texts
from serving.config import EngineConfig, ServeConfig

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.real, pytest.mark.timeout(600)]

KEY = "acme-key-0123456789abcdef"
CONFIG = FineTuningConfig(events_every_steps=1)
GREETINGS = ["Hi", "Hello there", "Good morning", "Hey", "Greetings", "Hi friend", "Howdy", "Good evening"]


def greeting_chats() -> bytes:
    """Eight chats that teach one reply, so a handful of steps moves the loss."""
    return "\n".join(json.dumps({"messages": [{"role": "user", "content": text},
                                              {"role": "assistant", "content": "Bonjour! How can I help?"}]})
                     for text in GREETINGS).encode()


def review_labels(count: int = 24) -> bytes:
    """Real reviews labelled by their length: a task whose labels a few steps can start on."""
    texts = review_texts("train")[:count]
    return "\n".join(json.dumps({"text": text, "label": "long" if len(text) > 100 else "short"})
                     for text in texts).encode()


def until_done(api, job_id: str, timeout_s: float = 400):
    deadline = time.monotonic() + timeout_s
    while (job := api.fine_tuning.jobs.retrieve(job_id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status} after {timeout_s} s"
        time.sleep(0.5)
    return job


def train_losses(api, job_id: str) -> list[float]:
    events = reversed(api.fine_tuning.jobs.list_events(job_id, limit=100).data)
    return [e.data["train_loss"] for e in events if e.type == "metrics" and "train_loss" in e.data]


@pytest.fixture
def edge_in_process(tmp_path) -> Iterator[dict]:
    """The real SmolLM2 behind the HTTP edge, served by uvicorn in a thread of this process."""
    from adapters.store.hub import AdapterHub
    from serving.api.app import create_app
    from serving.api.auth import KeyRing
    from serving.api.fine_tuning import FineTuning
    from serving.backend import LocalBackend
    from serving.config import LimitsConfig
    from serving.service import ModelService

    store = JobStore(str(tmp_path / "hub"))
    service = ModelService(EngineConfig(model="smollm2", hub=store.url, kernel_size=8))
    app = create_app(LocalBackend(service), KeyRing({KEY: "acme"}), LimitsConfig(), AdapterHub(store.url), "smollm2",
                     fine_tuning=FineTuning(store, CONFIG, 8, ("all",)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield {"base": f"http://127.0.0.1:{server.config.port}", "store": store}
    server.should_exit = True
    thread.join(timeout=10)
    service.close()


@pytest.mark.slow
def test_smollm2_learns_a_chat_reply_and_serves_it(edge_in_process):
    from training.job_runner import run_job, validate_job

    api = openai.OpenAI(base_url=f"{edge_in_process['base']}/v1", api_key=KEY, max_retries=0, timeout=120)
    store = edge_in_process["store"]
    file = api.files.create(file=("greetings.jsonl", greeting_chats()), purpose="fine-tune")
    job = api.fine_tuning.jobs.create(model="smollm2", training_file=file.id, suffix="greeter",
                                      hyperparameters={"n_epochs": 1, "batch_size": 2})
    assert job.status == "validating_files"
    assert validate_job(store, store.job("acme", job.id), CONFIG, "causal_lm").status == "queued"
    assert run_job(store.url, "smollm2", "acme", job.id, 1, CONFIG) == "succeeded"
    done = api.fine_tuning.jobs.retrieve(job.id)
    assert done.fine_tuned_model == "acme/greeter@1" and done.trained_tokens > 0
    curve = train_losses(api, job.id)
    assert len(curve) == 4 and curve[-1] < curve[0], curve  # 8 chats, 2 a step: one reply learnt
    answer = api.chat.completions.create(model=done.fine_tuned_model, max_tokens=8, temperature=0,
                                         messages=[{"role": "user", "content": "Hi"}])
    assert answer.choices[0].message.content and answer.usage.completion_tokens >= 1


@pytest.fixture
def minilm_app(tmp_path) -> Iterator[str]:
    pytest.importorskip("ray")
    from serving.launch import start, stop
    from training.job_scheduler import deploy

    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps({KEY: "acme"}))
    hub = str(tmp_path / "hub")
    config = ServeConfig(engine=EngineConfig(model="minilm", hub=hub, kernel_size=8), api_keys_file=str(keys_file),
                         watch_interval_s=0.5, fine_tuning=CONFIG)
    base = start({"/": config}, port=free_port(), timeout_s=240, names={"/": "minilm-ft"})
    try:
        deploy({hub: "minilm"}, CONFIG)
        yield base
    finally:
        stop()


def test_minilm_learns_labels_on_the_serve_app_and_classifies(minilm_app):
    api = openai.OpenAI(base_url=f"{minilm_app}/v1", api_key=KEY, max_retries=0, timeout=120)
    file = api.files.create(file=("reviews.jsonl", review_labels()), purpose="fine-tune")
    job = api.fine_tuning.jobs.create(model="minilm", training_file=file.id, validation_file=file.id, suffix="length",
                                      hyperparameters={"n_epochs": 1, "batch_size": 8})
    assert job.status == "validating_files"
    done = until_done(api, job.id)
    assert done.status == "succeeded", done.error
    assert len(train_losses(api, job.id)) == 3
    events = api.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any("valid_accuracy" in (e.data or {}) for e in events)
    r = httpx.post(f"{minilm_app}/v1/classify", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"adapter": done.fine_tuned_model, "inputs": ["A warm, funny, long film about friends."]})
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert result["label"] in ("long", "short") and sum(result["scores"].values()) == pytest.approx(1, abs=1e-4)
