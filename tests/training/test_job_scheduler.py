"""The fine-tuning scheduler on a real Ray cluster (local, no Serve): a new job's files validated, the fair
pick, a job whose worker is killed mid-run resuming from its checkpoint, and a job left `running` by a lost
scheduler ending `failed`."""

import json
import os
import signal
import time

import psutil
import pytest

from adapters.store.job_data import parse_training_file
from adapters.store.job_records import FileObject, FineTuningConfig, FineTuningJob, Hyperparameters, Method, new_id
from adapters.store.jobs import JobStore
from benchmarks.fixtures import tiny_llama_dir
from training.job_scheduler import JobScheduler, Run

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(400)
CONFIG = FineTuningConfig(events_every_steps=2, max_attempts=2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield tiny_llama_dir(tmp_path_factory.mktemp("sched") / "llama")
    ray.shutdown()


def queued(store: JobStore, tenant="acme", created_at=1, n_epochs=2, repeat=3, lines=None, status="queued",
           **fields) -> FineTuningJob:
    lines = lines or [{"prompt": f"say {w}", "completion": f" {w}"} for w in ["film", "plot", "cast", "great"] * repeat]
    data = "\n".join(map(json.dumps, lines)).encode()
    parsed = parse_training_file(data, CONFIG)
    file = store.add_file(tenant, FileObject(id=new_id("file"), bytes=len(data), filename="t.jsonl",
                                             format=parsed.format, examples=len(parsed.examples)), data)
    job = FineTuningJob(id=new_id("job"), model="llama", organization_id=tenant, training_file=file.id,
                        status=status, created_at=created_at, suffix="say", method=Method(dcft={"kernel_size": 4}),
                        hyperparameters=Hyperparameters(n_epochs=n_epochs, batch_size=2), **fields)
    return store.save_job(job)


def drive(scheduler: JobScheduler, until, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while not (found := until()):
        assert time.monotonic() < deadline, "the scheduler did not get there in time"
        scheduler.step()
        time.sleep(0.2)
    return found


def job_workers() -> list[int]:
    """The pids of the Ray workers running a job task (Ray titles a busy worker `ray::<task name>`)."""
    return [p.pid for p in psutil.process_iter(["cmdline"]) if "ray::job_task" in " ".join(p.info["cmdline"] or [])]


def test_a_new_jobs_files_are_validated_before_it_queues(tmp_path, cluster):
    store = JobStore(str(tmp_path / "hub"))
    fits = queued(store, status="validating_files")
    labels = [{"text": f"a {w}", "label": w} for w in ("good", "bad")]
    misfit = queued(store, lines=labels, status="validating_files", created_at=2)
    cancelled = queued(store, status="validating_files", created_at=3)
    store.request_cancel("acme", cancelled.id)
    scheduler = JobScheduler({store.url: str(cluster)}, CONFIG)
    assert [job.id for job in scheduler.scan(store)] == [fits.id]  # validated, queued, and nothing started
    assert store.job("acme", fits.id).status == "queued" and not scheduler.runs
    assert store.events("acme", fits.id)[0].message == "Files validated (12 training examples); the job is queued"
    failed = store.job("acme", misfit.id)
    assert failed.status == "failed" and failed.error.code == "invalid_training_file"
    assert failed.error.param == "training_file" and "this backbone is a causal LM" in failed.error.message
    assert store.job("acme", cancelled.id).status == "cancelled"


def test_the_pick_is_fair_between_tenants(tmp_path):
    store = JobStore(str(tmp_path / "hub"))
    a1, a2 = queued(store, "acme", created_at=1), queued(store, "acme", created_at=2)
    b1 = queued(store, "globex", created_at=3)
    scheduler = JobScheduler({store.url: "llama"}, CONFIG)
    scheduler._queued[store.url] = [a1, a2, b1]
    assert scheduler.pick()[1].id == a1.id  # oldest first
    scheduler.runs[a1.id] = Run(a1, store, ref=None)
    scheduler._queued[store.url] = [a2, b1]
    assert scheduler.pick()[1].id == b1.id  # acme runs one already: globex goes first


def test_a_killed_worker_resumes_from_its_checkpoint(tmp_path, cluster):
    store = JobStore(str(tmp_path / "hub"))
    job = queued(store, n_epochs=3, repeat=12)  # 24 steps an epoch
    scheduler = JobScheduler({store.url: str(cluster)}, CONFIG)
    drive(scheduler, lambda: store.checkpoints("acme", job.id))  # the first epoch is kept
    (worker,) = drive(scheduler, job_workers)
    os.kill(worker, signal.SIGKILL)
    done = drive(scheduler, lambda: (j := store.job("acme", job.id)).done and j)
    assert done.status == "succeeded" and done.attempts == 2 and done.fine_tuned_model == "acme/say@1"
    messages = [e.message for e in reversed(store.events("acme", job.id))]
    assert any(m.startswith("The job stopped: its worker was lost") for m in messages)
    assert any(m.startswith("Fine-tuning job resumed from the checkpoint at step") for m in messages)
    assert [c.epoch for c in store.checkpoints("acme", job.id)][0] == 3


def test_a_job_left_running_by_a_lost_scheduler_never_stays_running(tmp_path, cluster):
    store = JobStore(str(tmp_path / "hub"))
    spent = store.save_job(queued(store).model_copy(update={"status": "running", "attempts": 2}))
    again = store.save_job(queued(store, created_at=5).model_copy(update={"status": "running", "attempts": 1}))
    store.claim(again)  # its first run, claimed by the scheduler that is gone
    scheduler = JobScheduler({store.url: str(cluster)}, CONFIG)  # a new scheduler after a restart
    scheduler.step()
    failed = store.job("acme", spent.id)
    assert failed.status == "failed" and failed.error.code == "worker_lost"
    assert "its scheduler was restarted while it ran" in failed.error.message
    done = drive(scheduler, lambda: (j := store.job("acme", again.id)).done and j)
    assert done.status == "succeeded" and done.attempts == 2
    assert len(store.jobs("acme")) == 2  # no record lost
