"""Train-then-serve over real HTTP on 127.0.0.1 with the official `openai` client: upload a file, start a
job, watch its loss, call the result by name on each model replica; cancel, refusals, divergence, tenants'
privacy, and a restart of the whole app over the same hubs.

Two apps on one Serve instance, as in test_serve_app.py (a tiny Llama at /lm with two model replicas, a
tiny BERT at /enc), and the fine-tuning scheduler beside them, running each job as a Ray task on the same
cluster. /lm routes by power of two choices rather than by adapter, so a fine-tuned model's calls reach
both replicas, and the replicas' routing stats (GET /v1/admin/status) say which hold it.
"""

import json
import time

import httpx
import pytest

from adapters.store.hub import AdapterHub
from adapters.store.job_records import FineTuningConfig
from benchmarks.fixtures import tiny_bert_dir, tiny_llama_dir
from benchmarks.harness import free_port
from serving.config import EngineConfig, RoutingConfig, ServeConfig
from tests.serving.traffic import wait_for

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(600)

KEYS = {"acme-key-0123456789abcdef": "acme", "globex-key-0123456789abcd": "globex",
        "initech-key-0123456789abc": "initech", "admin-key-0123456789abcdef": "admin"}
KEY_OF = {tenant: key for key, tenant in KEYS.items()}
ADMIN = {"Authorization": f"Bearer {KEY_OF['admin']}"}
CONFIG = FineTuningConfig(events_every_steps=2, cancel_grace_s=3)
WORDS = ["film", "plot", "cast", "great"]
TERMINAL = ("succeeded", "failed", "cancelled")


def chat_lines(repeat: int = 3) -> bytes:
    lines = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
             for w in WORDS * repeat]
    return "\n".join(map(json.dumps, lines)).encode()


def label_lines() -> bytes:
    lines = [{"text": f"a {w} film", "label": "pos" if i % 2 else "neg"} for i, w in enumerate(WORDS * 3)]
    return "\n".join(map(json.dumps, lines)).encode()


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    pytest.importorskip("ray")
    from serving.launch import stop

    root = tmp_path_factory.mktemp("finetune")
    llama, bert = tiny_llama_dir(root / "llama"), tiny_bert_dir(root / "bert")
    keys_file = root / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    common = {"api_keys_file": str(keys_file), "watch_interval_s": 0.5, "fine_tuning": CONFIG}
    hubs = {"/lm": (str(root / "hub-lm"), llama), "/enc": (str(root / "hub-enc"), bert)}
    apps = {"/lm": ServeConfig(engine=EngineConfig(model=str(llama), hub=hubs["/lm"][0], kernel_size=4),
                               num_replicas=2, routing=RoutingConfig(adapter_affinity=False, stats_period_s=0.25),
                               **common),
            "/enc": ServeConfig(engine=EngineConfig(model=str(bert), hub=hubs["/enc"][0], kernel_size=4), **common)}
    scheduled = {hub: str(model) for hub, model in hubs.values()}
    state = {"apps": apps, "scheduled": scheduled, "lm_hub": AdapterHub(hubs["/lm"][0])}
    state["base"] = launch(state)
    yield state
    stop()


def launch(state: dict) -> str:
    """The two apps and the scheduler over the hubs in `state`; the base URL."""
    from serving.launch import start
    from training.job_scheduler import deploy

    apps = state["apps"]
    base = start(apps, port=free_port(), timeout_s=240, names={prefix: prefix.strip("/") for prefix in apps})
    deploy(state["scheduled"], CONFIG)
    return base


def client(app, tenant="acme", prefix="/lm") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{app['base']}{prefix}/v1", api_key=KEY_OF[tenant], max_retries=0, timeout=60)


def until_done(api, job_id: str, timeout_s: float = 240):
    """Poll retrieve until the job ends (no fixed sleeps: the deadline bounds the wait)."""
    deadline = time.monotonic() + timeout_s
    while (job := api.fine_tuning.jobs.retrieve(job_id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job still {job.status} after {timeout_s} s"
        time.sleep(0.25)
    return job


def test_the_whole_loop_with_the_openai_client(app):
    api = client(app)
    file = api.files.create(file=("train.jsonl", chat_lines()), purpose="fine-tune")
    assert file.purpose == "fine-tune" and file.bytes == len(chat_lines()) and file.filename == "train.jsonl"
    job = api.fine_tuning.jobs.create(model="llama", training_file=file.id, suffix="writer",
                                      hyperparameters={"n_epochs": 3, "batch_size": 4},
                                      method={"type": "dcft", "dcft": {"kernel_size": 4}})
    assert job.status == "validating_files" and job.hyperparameters.n_epochs == 3  # as OpenAI answers
    done = until_done(api, job.id)
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == "acme/writer@1" and done.trained_tokens > 0
    events = list(reversed(api.fine_tuning.jobs.list_events(job.id, limit=100).data))
    curve = [e.data["train_loss"] for e in events if e.type == "metrics" and "train_loss" in e.data]
    assert len(curve) >= 4 and curve[-1] < curve[0], curve  # every 2 of 9 steps, and falling
    checkpoints = api.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [9, 6, 3]
    answer = api.chat.completions.create(model=done.fine_tuned_model, max_tokens=4, temperature=0,
                                         messages=[{"role": "user", "content": "say film"}])
    assert answer.choices[0].message.role == "assistant" and answer.usage.completion_tokens >= 1
    assert answered_on_every_replica(app, api, done.fine_tuned_model) == {answer.choices[0].message.content}
    assert "acme/writer" not in app["lm_hub"].fleet.all()  # no admin step put it anywhere
    assert [j.id for j in api.fine_tuning.jobs.list(limit=5).data][0] == job.id
    assert any(e.message.startswith("Files validated (12 training examples)") for e in events)


def replicas(app, prefix: str = "/lm") -> list[dict]:
    """What every live model replica last told the routers (the admin status route)."""
    r = httpx.get(f"{app['base']}{prefix}/v1/admin/status", headers=ADMIN, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["replicas"]


def answered_on_every_replica(app, api, model: str, timeout_s: float = 60) -> set[str]:
    """Ask the same greedy question until both model replicas hold `model` on their device (a replica loads
    an adapter only to serve it, or for an admin placement, which this test never makes); the answers seen."""
    wait_for(lambda: len(replicas(app)) == 2, 60, "two model replicas in the router's view")
    name, texts = model.split("@")[0], set()
    deadline = time.monotonic() + timeout_s
    while sum(name in r.get("device_adapters", ()) for r in replicas(app)) < 2:
        assert time.monotonic() < deadline, f"{model} not on both replicas: {replicas(app)}"
        answer = api.chat.completions.create(model=model, max_tokens=4, temperature=0,
                                             messages=[{"role": "user", "content": "say film"}])
        texts.add(answer.choices[0].message.content)
        time.sleep(0.3)  # a stats period, so the report catches up with the calls
    return texts


def test_a_classifier_is_fine_tuned_and_classifies(app):
    api = client(app, "globex", "/enc")
    file = api.files.create(file=("labels.jsonl", label_lines()), purpose="fine-tune")
    job = api.fine_tuning.jobs.create(model="bert", training_file=file.id, suffix="mood",
                                      validation_file=file.id, hyperparameters={"n_epochs": 2, "batch_size": 4})
    done = until_done(api, job.id)
    assert done.status == "succeeded", done.error
    events = api.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert any("valid_accuracy" in (e.data or {}) for e in events)
    r = httpx.post(f"{app['base']}/enc/v1/classify", headers={"Authorization": f"Bearer {KEY_OF['globex']}"},
                   json={"adapter": done.fine_tuned_model, "inputs": ["a great film"]}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["label"] in ("neg", "pos")


def test_a_malformed_file_is_refused_with_its_line_numbers(app):
    api = client(app)
    bad = b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"\n{"prompt": "", "completion": "b"}\n'
    with pytest.raises(openai.BadRequestError) as err:
        api.files.create(file=("bad.jsonl", bad), purpose="fine-tune")
    message = err.value.body["message"]
    assert "line 2: invalid JSON" in message and 'line 3: "prompt" must be a non-empty string' in message
    assert err.value.body["code"] == "invalid_file"
    with pytest.raises(openai.BadRequestError, match="kernel 4"):
        api.fine_tuning.jobs.create(model="llama", training_file="file-" + "0" * 24,
                                    method={"type": "dcft", "dcft": {"kernel_size": 8}})
    with pytest.raises(openai.NotFoundError, match="no file 'file-0+' \\(training_file\\)"):
        api.fine_tuning.jobs.create(model="llama", training_file="file-" + "0" * 24)
    with pytest.raises(openai.NotFoundError):
        api.fine_tuning.jobs.create(model="gpt-4o-mini", training_file="file-" + "0" * 24)


def test_files_that_do_not_fit_their_job_fail_it_naming_the_file_and_lines(app):
    """OpenAI's lifecycle: the job is created `validating_files`, and a file that does not fit it fails
    the job with `error.param` naming the file, not the request."""
    classifier = client(app, prefix="/enc")
    chat = classifier.files.create(file=("chat.jsonl", chat_lines()), purpose="fine-tune")
    job = classifier.fine_tuning.jobs.create(model="bert", training_file=chat.id)
    assert job.status == "validating_files"
    failed = until_done(classifier, job.id)
    assert failed.status == "failed" and failed.error.code == "invalid_training_file"
    assert failed.error.param == "training_file" and "this backbone is a classifier" in failed.error.message
    labels = classifier.files.create(file=("labels.jsonl", label_lines()), purpose="fine-tune")
    odd = b'{"text": "a film", "label": "pos"}\n{"text": "a plot", "label": "meh"}\n'
    valid = classifier.files.create(file=("valid.jsonl", odd), purpose="fine-tune")
    job = classifier.fine_tuning.jobs.create(model="bert", training_file=labels.id, validation_file=valid.id)
    failed = until_done(classifier, job.id)
    assert failed.status == "failed" and failed.error.code == "invalid_validation_file"
    assert failed.error.message == ("validation_file has 1 invalid line: line 2: label 'meh' is not a label of "
                                    "the training file") and failed.error.param == "validation_file"
    assert not classifier.fine_tuning.jobs.checkpoints.list(job.id).data  # it never ran


def test_a_diverging_job_fails_with_its_reason(app):
    api = client(app, "initech")
    file = api.files.create(file=("train.jsonl", chat_lines()), purpose="fine-tune")
    job = api.fine_tuning.jobs.create(model="llama", training_file=file.id, suffix="boom",
                                      hyperparameters={"n_epochs": 3, "learning_rate_multiplier": 1e30})
    done = until_done(api, job.id)
    assert done.status == "failed" and done.error.code == "training_diverged"
    assert "training diverged" in done.error.message and done.fine_tuned_model is None
    assert not [v for v in app["lm_hub"].list(tenant="initech") if v.task == "boom"]


def test_cancel_stops_a_running_job_and_frees_its_cpu(app):
    import ray

    api = client(app, "initech")
    file = api.files.create(file=("long.jsonl", chat_lines(repeat=8)), purpose="fine-tune")
    job = api.fine_tuning.jobs.create(model="llama", training_file=file.id, suffix="long",
                                      hyperparameters={"n_epochs": 50, "batch_size": 2})
    deadline = time.monotonic() + 120
    while not any(e.type == "metrics" for e in api.fine_tuning.jobs.list_events(job.id).data):
        assert time.monotonic() < deadline and api.fine_tuning.jobs.retrieve(job.id).status not in TERMINAL
        time.sleep(0.25)
    asked = time.monotonic()
    cancelled = api.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and time.monotonic() - asked < 10
    assert not [v for v in app["lm_hub"].list(tenant="initech") if v.task == "long"]  # nothing published
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:  # the task's CPU comes back
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.25)
    with pytest.raises(openai.BadRequestError, match="cancelled already"):
        api.fine_tuning.jobs.cancel(job.id)


def test_another_tenants_ids_are_not_found(app):
    acme, globex = client(app), client(app, "globex")
    file = acme.files.create(file=("mine.jsonl", chat_lines()), purpose="fine-tune")
    job = acme.fine_tuning.jobs.list(limit=1).data[0]
    for call in (lambda: globex.files.retrieve(file.id), lambda: globex.files.content(file.id),
                 lambda: globex.files.delete(file.id), lambda: globex.fine_tuning.jobs.retrieve(job.id),
                 lambda: globex.fine_tuning.jobs.cancel(job.id), lambda: globex.fine_tuning.jobs.list_events(job.id),
                 lambda: globex.fine_tuning.jobs.checkpoints.list(job.id)):
        with pytest.raises(openai.NotFoundError):
            call()
    assert file.id not in {f.id for f in globex.files.list().data}
    assert job.id not in {j.id for j in globex.fine_tuning.jobs.list().data}
    assert acme.files.content(file.id).read() == chat_lines()
    assert acme.files.delete(file.id).deleted


def jobs_of_every_tenant(app) -> dict[tuple[str, str], list[tuple]]:
    """(app, tenant) -> each job's id, status, model, error code and event count, as the API lists them."""
    listed = {}
    for prefix in ("/lm", "/enc"):
        for tenant in ("acme", "globex", "initech"):
            api = client(app, tenant, prefix)
            listed[prefix, tenant] = [(j.id, j.status, j.fine_tuned_model, j.error and j.error.code,
                                       len(api.fine_tuning.jobs.list_events(j.id, limit=100).data))
                                      for j in api.fine_tuning.jobs.list(limit=100).data]
    return listed


def test_a_restarted_app_lists_the_same_jobs_and_serves_their_models(app):
    from serving.launch import stop

    api = client(app)
    file = api.files.create(file=("again.jsonl", chat_lines()), purpose="fine-tune")
    done = until_done(api, api.fine_tuning.jobs.create(model="llama", training_file=file.id, suffix="again",
                                                       hyperparameters={"n_epochs": 1, "batch_size": 4}).id)
    assert done.status == "succeeded", done.error
    waiting = api.fine_tuning.jobs.create(model="llama", training_file=file.id, hyperparameters={"n_epochs": 50})
    assert api.fine_tuning.jobs.cancel(waiting.id).status == "cancelled"
    question = {"model": done.fine_tuned_model, "max_tokens": 4, "temperature": 0,
                "messages": [{"role": "user", "content": "say plot"}]}
    before_answer = api.chat.completions.create(**question).choices[0].message.content
    listed = jobs_of_every_tenant(app)
    before = {key: [job for job in jobs if job[1] in TERMINAL] for key, jobs in listed.items()}  # none will move
    assert {done.id, waiting.id} <= {job[0] for job in before["/lm", "acme"]}

    stop()  # the Serve apps, the scheduler and the Ray instance all go
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{app['base']}/lm/readyz", timeout=5)
    app["base"] = launch(app)

    after = jobs_of_every_tenant(app)
    assert {key: len(jobs) for key, jobs in after.items()} == {key: len(jobs) for key, jobs in listed.items()}
    assert {key: [job for job in jobs if job in before[key]] for key, jobs in after.items()} == before
    again = client(app)
    assert again.fine_tuning.jobs.retrieve(done.id).fine_tuned_model == done.fine_tuned_model
    assert again.chat.completions.create(**question).choices[0].message.content == before_answer
