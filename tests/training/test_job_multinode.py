"""A fine-tuning job whose node is lost mid-run, on a real multi-node Ray cluster on this machine
(benchmarks/cluster.py: a head with no CPUs and two one-CPU worker nodes): the scheduler sends the job
back to the queue, it resumes from its last epoch checkpoint on the surviving node, and no record is lost."""

import pytest

from adapters.store.jobs import JobStore
from benchmarks.cluster import LocalCluster
from benchmarks.fixtures import tiny_llama_dir
from tests.training.test_job_scheduler import CONFIG, drive, queued
from training.job_scheduler import JobScheduler

pytestmark = pytest.mark.timeout(400)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    pytest.importorskip("ray")
    llama = tiny_llama_dir(tmp_path_factory.mktemp("multinode-job") / "llama")
    with LocalCluster(workers=2, worker_cpus=1) as local:
        yield local, llama


def job_node(local: LocalCluster) -> str | None:
    """The node running the job's task, from Ray's state API."""
    from ray.util.state import list_tasks

    running = list_tasks(address=local.address, filters=[("name", "=", "job_task"), ("state", "=", "RUNNING")],
                         raise_on_missing_output=False)
    return running[0].node_id if running else None


def test_a_job_whose_node_is_lost_resumes_from_its_checkpoint_on_another(tmp_path, cluster):
    local, llama = cluster
    store = JobStore(str(tmp_path / "hub"))
    job = queued(store, n_epochs=8, repeat=12)  # 24 steps an epoch: still training when its node goes
    scheduler = JobScheduler({store.url: str(llama)}, CONFIG)
    drive(scheduler, lambda: store.checkpoints("acme", job.id))  # the first epoch is kept
    lost = drive(scheduler, lambda: job_node(local))
    assert lost in local.worker_node_ids()
    local.remove_node(lost)
    done = drive(scheduler, lambda: (j := store.job("acme", job.id)).done and j, timeout_s=300)

    assert done.status == "succeeded" and done.attempts == 2 and done.fine_tuned_model == "acme/say@1"
    events = list(reversed(store.events("acme", job.id)))
    messages = [e.message for e in events]
    assert any(m.startswith("The job stopped: its worker was lost") for m in messages), messages
    resumed = next(m for m in messages if m.startswith("Fine-tuning job resumed from the checkpoint at step"))
    assert int(resumed.split("step ")[1].split(" ")[0]) % 24 == 0  # from an epoch's end
    assert [e.seq for e in events] == list(range(len(events)))  # every event kept, in order
    assert [c.epoch for c in store.checkpoints("acme", job.id)][0] == 8
    assert [j.id for j in store.jobs("acme")] == [job.id]
    assert lost not in local.live_node_ids() and len(local.live_node_ids()) == 2  # the run ended on the survivor
