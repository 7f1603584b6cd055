"""Fine-tuning records at rest, in OpenAI's field names: files, jobs, their events and checkpoints,
and the typed limits every part of the fine-tuning service reads (`FineTuningConfig`).

Plain pydantic, no I/O: `adapters/store/jobs.py` stores them in the hub's store, the HTTP edge
returns them as they are (the official `openai` client parses them), and the job runner writes them.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters.store.names import PART_PATTERN

JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
# What a training file holds, found by `adapters/store/job_data.py`: chat and prompt/completion train a
# causal LM, text/label (and text pairs) a classifier.
FileFormat = Literal["chat", "prompt_completion", "text_label", "text_pair_label"]
FORMATS_FOR_TASK: dict[str, tuple[str, ...]] = {
    "causal_lm": ("chat", "prompt_completion"),
    "seq_cls": ("text_label", "text_pair_label"),
}
ID_PREFIXES = {"file": "file", "job": "ftjob", "event": "ftevent", "checkpoint": "ftckpt"}
RECORD_ID = re.compile(r"(file|ftjob|ftevent|ftckpt)-[0-9a-f]{24}", re.ASCII)
SUFFIX = re.compile(PART_PATTERN, re.ASCII)


def new_id(kind: Literal["file", "job", "event", "checkpoint"]) -> str:
    return f"{ID_PREFIXES[kind]}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


class FineTuningConfig(BaseModel):
    """Limits and resources of the fine-tuning service (the edge, the queue and the runner read one)."""

    model_config = ConfigDict(extra="forbid")

    max_file_bytes: int = Field(16 << 20, ge=1024, description="Largest training or validation file accepted.")
    max_file_lines: int = Field(100_000, ge=1, description="Most JSONL lines in one file.")
    min_examples: int = Field(2, ge=1, description="Fewest examples a training file must hold.")
    reported_errors: int = Field(5, ge=1, le=100, description="How many problems a refused file's error names.")
    max_files_per_tenant: int = Field(100, ge=1)
    max_queued_per_tenant: int = Field(4, ge=1, description="A tenant's jobs waiting to run (429 beyond).")
    max_running_per_tenant: int = Field(1, ge=1, description="A tenant's jobs training at once.")
    max_running: int = Field(2, ge=1, description="Jobs training at once on the whole cluster.")
    max_queued: int = Field(64, ge=1, description="Jobs waiting on the whole cluster (503 beyond).")
    max_epochs: int = Field(50, ge=1)
    max_length: int = Field(256, ge=8, le=8192, description="Tokens of one example; longer ones are cut.")
    events_every_steps: int = Field(10, ge=1, description="A metrics event at least every this many steps.")
    job_num_cpus: float = Field(1, gt=0, description="CPUs a job asks Ray for where the cluster has no GPU.")
    job_num_gpus: float = Field(1, ge=0, description="GPUs a job asks for where the cluster has them.")
    max_attempts: int = Field(2, ge=1, description="Runs of a job, counting resumes after its worker was lost.")
    cancel_grace_s: float = Field(5.0, gt=0, description="A cancelled job not stopped by then is killed.")
    poll_interval_s: float = Field(0.5, gt=0, description="How often the scheduler looks for new work.")


# --- files -------------------------------------------------------------------------------------


class FileObject(BaseModel):
    """OpenAI's file object, plus what validation found (`format`, `examples`)."""

    model_config = ConfigDict(extra="forbid")

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int = Field(default_factory=now)
    filename: str
    purpose: Literal["fine-tune"] = "fine-tune"
    status: Literal["processed"] = "processed"
    status_details: str | None = None
    expires_at: int | None = None
    format: FileFormat
    examples: int
    labels: list[str] = Field(default_factory=list, description="Distinct labels of a text/label file, sorted.")


# --- jobs --------------------------------------------------------------------------------------


class Hyperparameters(BaseModel):
    """OpenAI's three knobs, resolved (no "auto" once a job is recorded)."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int = Field(3, ge=1)
    batch_size: int = Field(8, ge=1, le=1024)
    learning_rate_multiplier: float = Field(1.0, gt=0)


class DCFTSettings(BaseModel):
    """DCFT's own settings, carried in `method.dcft`."""

    model_config = ConfigDict(extra="forbid")

    kernel_size: int = Field(8, ge=1, le=128)
    stride: int | None = Field(None, ge=1, le=128)
    targets: list[str] = Field(default_factory=lambda: ["all"], min_length=1)
    learning_rate: float = Field(2e-2, gt=0, description="Base learning rate; learning_rate_multiplier scales it.")
    gamma: float = Field(0.1, ge=0, description="Weight of the orthogonal regulariser.")


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["dcft"] = "dcft"
    dcft: DCFTSettings = Field(default_factory=DCFTSettings)


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(BaseModel):
    """OpenAI's `fine_tuning.job`. `fine_tuned_model` is the published adapter, `TENANT/SUFFIX@N`."""

    model_config = ConfigDict(extra="forbid")

    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int = Field(default_factory=now)
    finished_at: int | None = None
    model: str
    fine_tuned_model: str | None = None
    organization_id: str  # the tenant
    result_files: list[str] = Field(default_factory=list)
    status: JobStatus = "validating_files"
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters
    method: Method
    trained_tokens: int | None = None
    error: JobError | None = None
    seed: int = 0
    suffix: str
    estimated_finish: int | None = None
    integrations: list[Any] | None = None
    metadata: dict[str, str] | None = None
    attempts: int = Field(0, description="Runs started; above 1 after a resume from a checkpoint.")

    @property
    def tenant(self) -> str:
        return self.organization_id

    @property
    def done(self) -> bool:
        return self.status in TERMINAL


class JobEvent(BaseModel):
    """OpenAI's `fine_tuning.job.event`; a metrics event's `data` holds step, train_loss, valid_loss
    (or valid_accuracy), examples and tokens per second: what a client needs to plot the loss."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: new_id("event"))
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int = Field(default_factory=now)
    level: Literal["info", "warn", "error"] = "info"
    message: str
    data: dict[str, Any] | None = None
    type: Literal["message", "metrics"] = "message"
    seq: int = Field(0, ge=0, description="Order within the job (several events share a second).")


class Checkpoint(BaseModel):
    """OpenAI's `fine_tuning.job.checkpoint`: the adapter at an epoch's end, kept in the job's store."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=lambda: new_id("checkpoint"))
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int = Field(default_factory=now)
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float] = Field(default_factory=dict)
    step_number: int = Field(ge=0)
    epoch: int = Field(ge=1)
