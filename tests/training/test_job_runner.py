"""One fine-tuning job run to its end from the hub's store (no Ray: the task's body, called here):
events, epoch checkpoints, the published adapter, loss only on the trained tokens, divergence, cancel,
and a resume from a checkpoint."""

import json
import math

import pytest

from adapters.store.hub import AdapterHub
from adapters.store.job_data import ChatExample, PromptCompletion, parse_training_file
from adapters.store.job_records import (
    DCFTSettings,
    FileObject,
    FineTuningConfig,
    FineTuningJob,
    Hyperparameters,
    Method,
    new_id,
)
from adapters.store.jobs import JobStore
from adapters.store.loading import read_checked_adapter
from backbones.loading import load_backbone, load_tokenizer
from benchmarks.fixtures import tiny_bert_dir, tiny_llama_dir
from training.job_runner import run_job
from training.supervised import IGNORED, tokenize_supervised

CONFIG = FineTuningConfig(events_every_steps=2)
WORDS = ["film", "plot", "cast", "great"]


def chat_file() -> bytes:
    lines = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": f"{w} {w}"}]}
             for w in WORDS * 3]
    return "\n".join(map(json.dumps, lines)).encode()


def label_file() -> bytes:
    lines = [{"text": f"a {w} film", "label": "pos" if i % 2 else "neg"} for i, w in enumerate(WORDS * 3)]
    return "\n".join(map(json.dumps, lines)).encode()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"llama": tiny_llama_dir(root / "llama"), "bert": tiny_bert_dir(root / "bert")}


def queued_job(store: JobStore, data: bytes, n_epochs=2, multiplier=1.0, model="llama") -> FineTuningJob:
    parsed = parse_training_file(data, CONFIG)
    file = store.add_file("acme", FileObject(id=new_id("file"), bytes=len(data), filename="train.jsonl",
                                             format=parsed.format, examples=len(parsed.examples)), data)
    job = FineTuningJob(id=new_id("job"), model=model, organization_id="acme", training_file=file.id, status="queued",
                        hyperparameters=Hyperparameters(n_epochs=n_epochs, batch_size=4,
                                                        learning_rate_multiplier=multiplier),
                        method=Method(dcft=DCFTSettings(kernel_size=4)), suffix="writer")
    return store.save_job(job)


def losses(store: JobStore, job: FineTuningJob) -> list[float]:
    return [e.data["train_loss"] for e in reversed(store.events("acme", job.id)) if e.data and "train_loss" in e.data]


def test_a_chat_job_trains_checkpoints_and_publishes(tmp_path, models):
    store = JobStore(str(tmp_path / "hub"))
    job = queued_job(store, chat_file())
    assert run_job(store.url, str(models["llama"]), "acme", job.id, 1, CONFIG) == "succeeded"
    done = store.job("acme", job.id)
    assert done.fine_tuned_model == "acme/writer@1" and done.trained_tokens > 0 and done.finished_at
    curve = losses(store, job)
    assert len(curve) >= 3 and curve[-1] < curve[0]  # events every 2 of 6 steps, and the loss falls
    metrics = next(e.data for e in store.events("acme", job.id) if e.data)
    assert {"step", "total_steps", "train_loss", "examples_per_second", "tokens_per_second"} <= set(metrics)
    assert [c.epoch for c in store.checkpoints("acme", job.id)] == [2, 1]
    hub = AdapterHub(store.url)
    config, _ = read_checked_adapter(hub.fetch(done.fine_tuned_model),
                                     load_backbone(models["llama"], "causal_lm", None))
    assert config.task_type == "causal_lm" and config.kernel_size == 4


def test_a_classifier_job_learns_its_labels(tmp_path, models):
    store = JobStore(str(tmp_path / "hub"))
    job = queued_job(store, label_file(), model="bert")
    assert run_job(store.url, str(models["bert"]), "acme", job.id, 1, CONFIG) == "succeeded"
    adapter = AdapterHub(store.url).fetch(store.job("acme", job.id).fine_tuned_model)
    assert json.loads((adapter / "adapter_config.json").read_text())["labels"] == ["neg", "pos"]


def test_loss_falls_only_on_the_assistant_and_completion_tokens(models):
    tokenizer = load_tokenizer(models["llama"])
    chat = ChatExample((("user", "say film"), ("assistant", "film"), ("user", "again"), ("assistant", "plot")),
                       (False, False, False, True))
    (row,) = tokenize_supervised([chat], tokenizer, 128).rows
    trained = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORED]
    assert trained == tokenizer("plot", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    (long,) = tokenize_supervised([PromptCompletion("word " * 200, "the end")], tokenizer, 32).rows
    assert len(long["input_ids"]) == 32 and long["labels"][-1] == tokenizer.eos_token_id


def test_a_diverging_job_fails_with_its_reason_and_publishes_nothing(tmp_path, models):
    store = JobStore(str(tmp_path / "hub"))
    job = queued_job(store, chat_file(), multiplier=1e30)
    assert run_job(store.url, str(models["llama"]), "acme", job.id, 1, CONFIG) == "failed"
    failed = store.job("acme", job.id)
    assert failed.error.code == "training_diverged"
    assert "training diverged" in failed.error.message and failed.fine_tuned_model is None
    assert AdapterHub(store.url).list() == [] and store.checkpoints("acme", job.id) == []
    assert all(math.isfinite(loss) for loss in losses(store, job))  # the events hold numbers; the reason says nan


def test_a_job_cancelled_before_it_runs_never_trains(tmp_path, models):
    store = JobStore(str(tmp_path / "hub"))
    job = queued_job(store, chat_file())
    store.request_cancel("acme", job.id)
    assert run_job(store.url, str(models["llama"]), "acme", job.id, 1, CONFIG) == "cancelled"
    assert AdapterHub(store.url).list() == [] and losses(store, job) == []


def test_a_second_run_resumes_from_the_last_checkpoint(tmp_path, models):
    store = JobStore(str(tmp_path / "hub"))
    first = queued_job(store, chat_file(), n_epochs=1)
    run_job(store.url, str(models["llama"]), "acme", first.id, 1, CONFIG)
    (checkpoint,) = store.checkpoints("acme", first.id)
    job = queued_job(store, chat_file(), n_epochs=2)
    store.add_checkpoint("acme", checkpoint.model_copy(update={"fine_tuning_job_id": job.id}),
                         store.fetch_checkpoint("acme", checkpoint, tmp_path / "ckpt"))
    assert run_job(store.url, str(models["llama"]), "acme", job.id, 2, CONFIG) == "succeeded"
    events = [e.message for e in reversed(store.events("acme", job.id))]
    assert events[0] == "Fine-tuning job resumed from the checkpoint at step 3 (run 2): 12 training examples, " \
                        "0 validation examples"
    steps = [e.data["step"] for e in reversed(store.events("acme", job.id)) if e.data]
    assert steps[0] == 4 and steps[-1] == 6  # the second epoch only, numbered after the first
    assert store.job("acme", job.id).attempts == 2
