"""Run one claimed fine-tuning job from the hub's store to the hub: read and check its files, train
(training/job.py), keep its events and epoch checkpoints in the store, and publish the adapter as
`TENANT/SUFFIX@N`, which every serving replica picks up through the hub's change token. A cancelled
or diverged job publishes nothing. This is the body of the Ray task `training/job_scheduler.py` starts."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from transformers import AutoConfig

from adapters.config import DCFTConfig
from adapters.errors import AdapterError, AdapterNotFoundError, TrainingFileError
from adapters.store.hub import AdapterHub
from adapters.store.job_data import check_job_files, parse_training_file
from adapters.store.job_records import Checkpoint, FineTuningConfig, FineTuningJob, JobError, JobEvent, now
from adapters.store.jobs import JobStore
from backbones.loading import is_causal_lm
from backbones.shipped import resolve_model_dir
from training.config import OptimConfig
from training.job import JobOutcome, JobSpec, JobTask, Resume, train_job

logger = logging.getLogger(__name__)

CANCEL_CHECK_S = 0.5  # how often a running job looks for a cancel (one small read of the store)


class StoreHooks:
    """A running job's events, cancel checks and checkpoints, kept in its store."""

    def __init__(self, store: JobStore, job: FineTuningJob):
        self.store, self.job = store, job
        self._checked, self._cancelled = 0.0, False

    def event(self, message: str, data: dict | None = None, level: str = "info") -> None:
        kind = "metrics" if data else "message"
        self.store.add_event(self.job.tenant, self.job.id, JobEvent(message=message, data=data, level=level,
                                                                    type=kind))

    def should_stop(self) -> bool:
        if not self._cancelled and time.monotonic() - self._checked > CANCEL_CHECK_S:
            self._checked = time.monotonic()
            self._cancelled = self.store.cancel_requested(self.job.tenant, self.job.id)
        return self._cancelled

    def checkpoint(self, step: int, epoch: int, adapter_dir: Path, metrics: dict[str, float]) -> None:
        name = f"{self.job.tenant}/{self.job.suffix}:ckpt-step-{step}"
        record = Checkpoint(fine_tuned_model_checkpoint=name, fine_tuning_job_id=self.job.id, step_number=step,
                            epoch=epoch, metrics={"step": float(step), **metrics})
        self.store.add_checkpoint(self.job.tenant, record, adapter_dir)
        self.event(f"Checkpoint at the end of epoch {epoch} (step {step})")


def backbone_task(model_dir: Path) -> JobTask:
    return "causal_lm" if is_causal_lm(AutoConfig.from_pretrained(model_dir, local_files_only=True)) else "seq_cls"


def job_spec(job: FineTuningJob, model_dir: Path, labels: list[str], config: FineTuningConfig,
             device: str | None = None) -> JobSpec:
    dcft, hyper = job.method.dcft, job.hyperparameters
    optim = OptimConfig(epochs=hyper.n_epochs, batch_size=hyper.batch_size, eval_batch_size=max(hyper.batch_size, 32),
                        learning_rate=dcft.learning_rate * hyper.learning_rate_multiplier, gamma=dcft.gamma,
                        logging_steps=config.events_every_steps, max_length=config.max_length, seed=job.seed)
    adapter = DCFTConfig(kernel_size=dcft.kernel_size, stride=dcft.stride, targets=dcft.targets)
    return JobSpec(model_dir, backbone_task(model_dir), adapter, optim, tuple(labels), device)


def validate_job(store: JobStore, job: FineTuningJob, config: FineTuningConfig, task: str) -> FineTuningJob:
    """A job `validating_files` checked against its backbone's task: `queued`, or `failed` with OpenAI's
    error (`invalid_training_file` or `invalid_validation_file`, `param` naming the file, the message its
    first bad lines). A cancelled job ends `cancelled` and is not checked."""
    if store.cancel_requested(job.tenant, job.id):
        current = store.job(job.tenant, job.id)
        return current if current.done else finish(store, current, "cancelled")
    try:
        train, valid = check_job_files(job_file(store, job, "training_file"), job_file(store, job, "validation_file"),
                                       config, task)
        problem = None
    except TrainingFileError as err:
        problem = err
    if not still_validating(store, job):
        return store.job(job.tenant, job.id)
    if problem is not None:
        error = JobError(code=f"invalid_{problem.param}", message=str(problem), param=problem.param)
        return finish(store, job, "failed", error=error)
    job = store.save_job(job.model_copy(update={"status": "queued"}))
    held = f", {len(valid.examples)} validation examples" if valid else ""
    store.add_event(job.tenant, job.id, JobEvent(message=f"Files validated ({len(train.examples)} training "
                                                 f"examples{held}); the job is queued"))
    return job


def job_file(store: JobStore, job: FineTuningJob, param: str) -> bytes | None:
    file_id = getattr(job, param)
    if file_id is None:
        return None
    try:
        return store.file_content(job.tenant, file_id)
    except AdapterNotFoundError:
        raise TrainingFileError(f"{param} '{file_id}' no longer exists", param) from None


def still_validating(store: JobStore, job: FineTuningJob) -> bool:
    """Read again just before the write: a cancel that came while the files were read has the last word
    (one that comes after it is seen by the scheduler's next look at the queued job)."""
    return (store.job(job.tenant, job.id).status == "validating_files"
            and not store.cancel_requested(job.tenant, job.id))


def run_job(hub_url: str, model: str, tenant: str, job_id: str, attempt: int, config: FineTuningConfig,
            device: str | None = None) -> str:
    """Run the job's `attempt` to its end and return its final status; every failure of ours is recorded
    in the job (status failed, with the reason), so only a lost worker leaves it `running`."""
    store = JobStore(hub_url)
    job = store.job(tenant, job_id)
    hooks = StoreHooks(store, job)
    if store.cancel_requested(tenant, job_id):
        return finish(store, job, "cancelled").status
    job = store.save_job(job.model_copy(update={"status": "running", "attempts": attempt}))
    hooks.job = job
    try:
        outcome = train_attempt(store, job, hooks, resolve_model_dir(model), attempt, config, device)
        return conclude(store, hub_url, job, outcome).status
    except AdapterError as err:
        return finish(store, job, "failed", error=JobError(code="invalid_training_file", message=str(err))).status
    except Exception:
        logger.exception("fine-tuning job %s failed", job_id)
        error = JobError(code="internal_error", message="training failed on an internal error")
        return finish(store, job, "failed", error=error).status


def train_attempt(store: JobStore, job: FineTuningJob, hooks: StoreHooks, model_dir: Path, attempt: int,
                  config: FineTuningConfig, device: str | None) -> JobOutcome:
    train = parse_training_file(store.file_content(job.tenant, job.training_file), config, "training_file")
    validation = (parse_training_file(store.file_content(job.tenant, job.validation_file), config,
                                      "validation_file").examples if job.validation_file else ())
    spec = job_spec(job, model_dir, train.labels, config, device)
    with tempfile.TemporaryDirectory(prefix="dcft-job-") as tmp:
        resume = resume_point(store, job, Path(tmp) / "resume") if attempt > 1 else None
        where = f"resumed from the checkpoint at step {resume.step}" if resume else "started"
        hooks.event(f"Fine-tuning job {where} (run {attempt}): {len(train.examples)} training examples, "
                    f"{len(validation)} validation examples")
        outcome = train_job(spec, train.examples, validation, hooks, Path(tmp), resume)
        if outcome.state == "done" and store.cancel_requested(job.tenant, job.id):
            return JobOutcome("cancelled", reason="cancelled by the tenant")
        if outcome.state == "done":  # publish before the work folder goes
            outcome.published = publish(store, job, hooks, outcome)
        return outcome


def resume_point(store: JobStore, job: FineTuningJob, dest: Path) -> Resume | None:
    checkpoints = store.checkpoints(job.tenant, job.id)
    if not checkpoints:
        return None
    last = checkpoints[0]
    return Resume(store.fetch_checkpoint(job.tenant, last, dest), last.epoch, last.step_number)


def publish(store: JobStore, job: FineTuningJob, hooks: StoreHooks, outcome: JobOutcome) -> str:
    """Publish the adapter; return the name the tenant calls it by."""
    version = AdapterHub(store.url).publish(outcome.adapter_dir, f"{job.tenant}/{job.suffix}")
    hooks.event(f"Published {version.ref}")
    return version.ref


def conclude(store: JobStore, hub_url: str, job: FineTuningJob, outcome: JobOutcome) -> FineTuningJob:
    if outcome.state == "cancelled":
        return finish(store, job, "cancelled")
    if outcome.state == "diverged":
        return finish(store, job, "failed", error=JobError(code="training_diverged", message=outcome.reason or ""))
    return finish(store, job, "succeeded", fine_tuned_model=outcome.published, trained_tokens=outcome.trained_tokens)


def finish(store: JobStore, job: FineTuningJob, status: str, **updates) -> FineTuningJob:
    job = store.save_job(job.model_copy(update={"status": status, "finished_at": now(), **updates}))
    level = "error" if status == "failed" else "info"
    reason = f": {job.error.message}" if job.error else ""
    store.add_event(job.tenant, job.id, JobEvent(message=f"Fine-tuning job {status}{reason}", level=level))
    return job
