"""The fine-tuning store: per-tenant records in the hub's store, atomic, exclusive where it matters."""

import pytest

from adapters.errors import RecordNotFoundError
from adapters.store.job_records import Checkpoint, FileObject, FineTuningJob, Hyperparameters, JobEvent, Method, new_id
from adapters.store.jobs import JobStore
from benchmarks.fixtures import random_adapter, tiny_bert_dir


@pytest.fixture(params=["local", "memory"])
def store(request, tmp_path):
    if request.param == "memory":
        return JobStore(f"memory://jobs-{new_id('file')}")
    return JobStore(str(tmp_path / "hub"))


def a_job(tenant="acme", **fields) -> FineTuningJob:
    return FineTuningJob(id=new_id("job"), model="llama", organization_id=tenant, training_file=new_id("file"),
                         hyperparameters=Hyperparameters(), method=Method(), suffix="writer", **fields)


def test_files_round_trip_per_tenant(store):
    record = FileObject(id=new_id("file"), bytes=3, filename="a.jsonl", format="chat", examples=1)
    store.add_file("acme", record, b"abc")
    assert store.file("acme", record.id) == record and store.file_content("acme", record.id) == b"abc"
    assert [f.id for f in store.files("acme")] == [record.id] and store.files("globex") == []
    with pytest.raises(RecordNotFoundError):
        store.file("globex", record.id)  # another tenant's id: not found
    store.delete_file("acme", record.id)
    with pytest.raises(RecordNotFoundError):
        store.file_content("acme", record.id)


@pytest.mark.parametrize("bad", ["../acme", "file-x", "ftjob-" + "0" * 24, "file-" + "0" * 23 + "/"])
def test_ids_outside_the_grammar_are_not_found(store, bad):
    with pytest.raises(RecordNotFoundError):
        store.file("acme", bad)


def test_jobs_events_claims_and_cancel(store):
    older, newer = a_job(created_at=1), a_job(created_at=2)
    store.save_job(older)
    store.save_job(newer)
    store.save_job(a_job(tenant="globex"))
    assert [j.id for j in store.jobs("acme")] == [newer.id, older.id]
    assert len(store.all_jobs()) == 3
    with pytest.raises(RecordNotFoundError):
        store.job("globex", older.id)
    first = store.add_event("acme", older.id, JobEvent(message="queued"))
    second = store.add_event("acme", older.id, JobEvent(message="running"))
    assert (first.seq, second.seq) == (0, 1)
    assert [e.message for e in store.events("acme", older.id)] == ["running", "queued"]
    assert not store.claimed("acme", older.id)
    assert (store.claim(older), store.claim(older)) == (1, 2) and store.claimed("acme", older.id)
    assert not store.cancel_requested("acme", older.id)
    token = store.changes.read()
    store.request_cancel("acme", older.id)
    assert store.cancel_requested("acme", older.id) and store.changes.read() != token


def test_checkpoints_keep_their_adapter(store, tmp_path):
    bert = tiny_bert_dir(tmp_path / "bert")
    adapter = random_adapter(bert, tmp_path / "a", "seq_cls", seed=0, kernel=4)
    job = store.save_job(a_job())
    checkpoint = Checkpoint(fine_tuned_model_checkpoint="acme/writer:step-4", fine_tuning_job_id=job.id,
                            step_number=4, epoch=1, metrics={"train_loss": 1.5})
    store.add_checkpoint("acme", checkpoint, adapter)
    assert store.checkpoints("acme", job.id) == [checkpoint]
    copy = store.fetch_checkpoint("acme", checkpoint, tmp_path / "copy")
    assert (copy / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
