"""OpenAI's files and fine-tuning routes, per tenant, behind the same keys, quotas and error contract.

The edge checks and records; it never trains. Checks happen when OpenAI's API makes them:

- `POST /v1/files` parses and checks the file whole before it is kept: a malformed file answers 400
  naming its first bad lines, and no job can name it.
- `POST /v1/fine_tuning/jobs` checks the request itself (model, suffix, hyperparameters, DCFT settings,
  that the files exist, the queue bounds) and answers the job `validating_files`, as OpenAI's API does.
  The scheduler (training/job_scheduler.py) then checks the files against the backbone and each other,
  and moves the job to `queued`, or to `failed` with OpenAI's `error` (`invalid_training_file` or
  `invalid_validation_file`, `param` naming the file, the message its bad lines): OpenAI reports a
  file that does not fit its job on the job, not as a refused request.

Jobs live in the hub's store (adapters/store/jobs.py); a cancel is a marker the running job sees within
a step. Every id is looked up under the caller's tenant: another tenant's id is not found (404).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from adapters.errors import AdapterNotFoundError
from adapters.store.job_data import parse_training_file
from adapters.store.job_records import (
    SUFFIX,
    DCFTSettings,
    FileObject,
    FineTuningConfig,
    FineTuningJob,
    Hyperparameters,
    JobEvent,
    Method,
    new_id,
    now,
)
from adapters.store.jobs import JobStore
from serving.api import schemas as s
from serving.api.auth import Caller
from serving.api.edge import AnyCaller, Edge, EdgeState
from serving.api.errors import ERROR_RESPONSES, naming
from serving.errors import InvalidRequestError, LimitError, OverloadedError, RateLimitedError

router = APIRouter(responses=ERROR_RESPONSES)
T = TypeVar("T")
Limit = Annotated[int, Query(ge=1, le=100)]
WAITING = ("validating_files", "queued")
CANCEL_POLL_S = 0.2


@dataclass(frozen=True)
class FineTuning:
    """What the fine-tuning routes need: the store, the limits, and what the serving replicas can mix."""

    store: JobStore
    config: FineTuningConfig
    kernel_size: int
    targets: tuple[str, ...]


def fine_tuning_of(edge: Edge) -> FineTuning:
    if edge.fine_tuning is None:
        raise InvalidRequestError("fine-tuning is not enabled on this server")
    return edge.fine_tuning


def page(items: Sequence[T], after: str | None, limit: int) -> s.ListPage:
    """OpenAI's cursor pagination: the items after the one with id `after`, at most `limit` of them."""
    if after is not None:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return s.ListPage(data=list(items[:limit]), has_more=len(items) > limit)


async def admitted(edge: Edge, who: Caller, route: str, call, *args: Any):
    """One store call in a worker thread, counted against the tenant's quota like any request."""
    async with edge.admission.admit(who.tenant, route, None):
        return await asyncio.to_thread(call, *args)


# --- files ---------------------------------------------------------------------------------------


@router.post("/v1/files", response_model=FileObject)
async def upload_file(request: Request, who: AnyCaller, edge: EdgeState):
    tuning = fine_tuning_of(edge)
    form = await request.form(max_files=1, max_fields=4)
    upload, purpose = form.get("file"), form.get("purpose")
    if purpose != "fine-tune":
        raise InvalidRequestError("purpose must be 'fine-tune' (the only files this server keeps)", "purpose")
    if not isinstance(upload, UploadFile):
        raise InvalidRequestError("send the file as the multipart field 'file'", "file")
    data = await upload.read()
    return await admitted(edge, who, "files", keep_file, tuning, who.tenant, data, upload.filename or "upload.jsonl")


def keep_file(tuning: FineTuning, tenant: str, data: bytes, filename: str) -> FileObject:
    if len(tuning.store.files(tenant)) >= tuning.config.max_files_per_tenant:
        raise LimitError(f"this tenant keeps {tuning.config.max_files_per_tenant} files, the limit; delete some first")
    parsed = parse_training_file(data, tuning.config)
    name = PurePath(filename.replace("\\", "/")).name[:256] or "upload.jsonl"  # no client path is kept
    record = FileObject(id=new_id("file"), bytes=len(data), filename=name, format=parsed.format,
                        examples=len(parsed.examples), labels=parsed.labels)
    return tuning.store.add_file(tenant, record, data)


@router.get("/v1/files", response_model=s.ListPage)
async def list_files(who: AnyCaller, edge: EdgeState, after: str | None = None, limit: Limit = 100):
    files = await admitted(edge, who, "files", fine_tuning_of(edge).store.files, who.tenant)
    return page(files, after, limit)


@router.get("/v1/files/{file_id}", response_model=FileObject)
@naming("file_id")
async def retrieve_file(file_id: str, who: AnyCaller, edge: EdgeState):
    return await admitted(edge, who, "files", fine_tuning_of(edge).store.file, who.tenant, file_id)


@router.get("/v1/files/{file_id}/content")
@naming("file_id")
async def file_content(file_id: str, who: AnyCaller, edge: EdgeState):
    data = await admitted(edge, who, "files", fine_tuning_of(edge).store.file_content, who.tenant, file_id)
    return Response(data, media_type="application/octet-stream")


@router.delete("/v1/files/{file_id}", response_model=s.FileDeleted)
@naming("file_id")
async def delete_file(file_id: str, who: AnyCaller, edge: EdgeState):
    await admitted(edge, who, "files", remove_file, fine_tuning_of(edge), who.tenant, file_id)
    return s.FileDeleted(id=file_id)


def remove_file(tuning: FineTuning, tenant: str, file_id: str) -> None:
    tuning.store.file(tenant, file_id)
    using = [job.id for job in tuning.store.jobs(tenant)
             if not job.done and file_id in (job.training_file, job.validation_file)]
    if using:
        raise InvalidRequestError(f"file '{file_id}' is used by fine-tuning job '{using[0]}', which has not "
                                  "finished; cancel it first", "file_id")
    tuning.store.delete_file(tenant, file_id)


# --- jobs ----------------------------------------------------------------------------------------


@router.post("/v1/fine_tuning/jobs", response_model=FineTuningJob)
@naming("model")
async def create_job(body: s.JobCreateRequest, who: AnyCaller, edge: EdgeState):
    tuning = fine_tuning_of(edge)
    if body.model != edge.backbone_name:
        raise AdapterNotFoundError(f"model '{body.model}' cannot be fine-tuned here; this server fine-tunes its "
                                   f"backbone '{edge.backbone_name}'")
    job = planned_job(tuning, body, who.tenant)
    return await admitted(edge, who, "fine_tuning", record_job, tuning, job)


def planned_job(tuning: FineTuning, body: s.JobCreateRequest, tenant: str) -> FineTuningJob:
    """The job the request describes, "auto" resolved, its DCFT settings checked against the replicas."""
    job_id = new_id("job")
    suffix = body.suffix if body.suffix is not None else f"ft-{job_id[-8:]}"
    if not SUFFIX.fullmatch(suffix):
        raise InvalidRequestError("suffix must match [a-z0-9][a-z0-9._-]{0,63}: it names the adapter "
                                  "TENANT/SUFFIX", "suffix")
    asked = body.chosen_hyperparameters()
    if asked.n_epochs != "auto" and asked.n_epochs > tuning.config.max_epochs:
        raise InvalidRequestError(f"n_epochs is {asked.n_epochs}; the limit is {tuning.config.max_epochs}",
                                  "hyperparameters.n_epochs")
    hyper = Hyperparameters(**{name: value for name, value in asked.model_dump().items() if value != "auto"})
    return FineTuningJob(id=job_id, model=body.model, organization_id=tenant, training_file=body.training_file,
                         validation_file=body.validation_file, hyperparameters=hyper,
                         method=Method(dcft=dcft_settings(tuning, body)), seed=body.seed or 0, suffix=suffix,
                         metadata=body.metadata, status="validating_files")


def dcft_settings(tuning: FineTuning, body: s.JobCreateRequest) -> DCFTSettings:
    """The serving replicas mix one kernel size at its own stride over their target layers: a job must fit."""
    asked = (body.method and body.method.dcft) or s.DCFTMethodIn()
    kernel = asked.kernel_size or tuning.kernel_size
    if kernel != tuning.kernel_size or asked.stride not in (None, kernel):
        raise InvalidRequestError(f"the serving replicas mix DCFT kernel {tuning.kernel_size} at stride "
                                  f"{tuning.kernel_size}; fine-tune with that kernel_size and stride",
                                  "method.dcft.kernel_size")
    targets = asked.targets or list(tuning.targets)
    if list(tuning.targets) != ["all"] and targets != list(tuning.targets):
        raise InvalidRequestError(f"the serving replicas wrap targets {list(tuning.targets)}; fine-tune those",
                                  "method.dcft.targets")
    extra = {name: value for name in ("learning_rate", "gamma") if (value := getattr(asked, name)) is not None}
    return DCFTSettings(kernel_size=kernel, stride=asked.stride, targets=targets, **extra)


def record_job(tuning: FineTuning, job: FineTuningJob) -> FineTuningJob:
    """Check that the job's files exist and the queue's bounds, then record it `validating_files`."""
    store, config = tuning.store, tuning.config
    for file_id, param in ((job.training_file, "training_file"), (job.validation_file, "validation_file")):
        if file_id is not None:
            existing_file(store, job.tenant, file_id, param)
    mine = [j for j in store.jobs(job.tenant) if j.status in WAITING]
    if len(mine) >= config.max_queued_per_tenant:
        raise RateLimitedError(f"{len(mine)} fine-tuning jobs queued; this tenant's limit is "
                               f"{config.max_queued_per_tenant}", 30.0, "jobs")
    if sum(j.status in WAITING for j in store.all_jobs()) >= config.max_queued:
        raise OverloadedError("the fine-tuning queue is full; retry later")
    store.save_job(job)
    named = ", ".join(f"{param} {file_id}" for param, file_id in (("training_file", job.training_file),
                                                                   ("validation_file", job.validation_file)) if file_id)
    store.add_event(job.tenant, job.id, JobEvent(message=f"Validating the files: {named}"))
    store.changes.bump()
    return job


def existing_file(store: JobStore, tenant: str, file_id: str, param: str) -> None:
    try:
        store.file(tenant, file_id)
    except AdapterNotFoundError:
        raise AdapterNotFoundError(f"no file '{file_id}' ({param})") from None


@router.get("/v1/fine_tuning/jobs", response_model=s.ListPage)
async def list_jobs(who: AnyCaller, edge: EdgeState, after: str | None = None, limit: Limit = 20):
    jobs = await admitted(edge, who, "fine_tuning", fine_tuning_of(edge).store.jobs, who.tenant)
    return page(jobs, after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}", response_model=FineTuningJob)
@naming("fine_tuning_job_id")
async def retrieve_job(job_id: str, who: AnyCaller, edge: EdgeState):
    return await admitted(edge, who, "fine_tuning", fine_tuning_of(edge).store.job, who.tenant, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel", response_model=FineTuningJob)
@naming("fine_tuning_job_id")
async def cancel_job(job_id: str, who: AnyCaller, edge: EdgeState):
    """Ask the job to stop, then wait (a few seconds at most) until it has: a running job stops within a
    step, and one that is not stopped by `cancel_grace_s` is killed by the scheduler."""
    tuning = fine_tuning_of(edge)
    job = await admitted(edge, who, "fine_tuning", request_cancel, tuning, who.tenant, job_id)
    deadline = time.monotonic() + tuning.config.cancel_grace_s + 2 * tuning.config.poll_interval_s + 2
    while not job.done and time.monotonic() < deadline:
        await asyncio.sleep(CANCEL_POLL_S)
        job = await asyncio.to_thread(tuning.store.job, who.tenant, job_id)
    return job


def request_cancel(tuning: FineTuning, tenant: str, job_id: str) -> FineTuningJob:
    store = tuning.store
    job = store.job(tenant, job_id)
    if job.done:
        raise InvalidRequestError(f"fine-tuning job '{job_id}' has {job.status} already", "fine_tuning_job_id")
    store.request_cancel(tenant, job_id)
    if store.claimed(tenant, job_id):  # after our marker: see adapters/store/jobs.py; the scheduler ends it
        return job
    job = store.save_job(job.model_copy(update={"status": "cancelled", "finished_at": now()}))
    store.add_event(tenant, job_id, JobEvent(message="Fine-tuning job cancelled before it started"))
    return job


@router.get("/v1/fine_tuning/jobs/{job_id}/events", response_model=s.ListPage)
@naming("fine_tuning_job_id")
async def job_events(job_id: str, who: AnyCaller, edge: EdgeState, after: str | None = None,
                     limit: Limit = 20):
    events = await admitted(edge, who, "fine_tuning", fine_tuning_of(edge).store.events, who.tenant, job_id)
    return page(events, after, limit)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints", response_model=s.ListPage)
@naming("fine_tuning_job_id")
async def job_checkpoints(job_id: str, who: AnyCaller, edge: EdgeState, after: str | None = None,
                          limit: Limit = 10):
    checkpoints = await admitted(edge, who, "fine_tuning", fine_tuning_of(edge).store.checkpoints, who.tenant,
                                 job_id)
    return page(checkpoints, after, limit)
