"""Fine-tuning files, jobs, events and checkpoints in the hub's own store (the same URL, any fsspec
store), so they outlive the Serve app and the Ray cluster. Layout under the hub root:

    finetune/changes                                   a token rewritten whenever work appears or is cancelled
    finetune/<tenant>/files/<file-id>/file.json        FileObject (written last: the commit point)
    finetune/<tenant>/files/<file-id>/content.jsonl    the uploaded bytes
    finetune/<tenant>/jobs/<job-id>/job.json           FineTuningJob, rewritten whole on every change
    finetune/<tenant>/jobs/<job-id>/events/<seq>.json  one JobEvent each, created exclusively
    finetune/<tenant>/jobs/<job-id>/claims/<attempt>   the scheduler's claim on one run (exclusive)
    finetune/<tenant>/jobs/<job-id>/cancel             the tenant asked to cancel
    finetune/<tenant>/jobs/<job-id>/checkpoints/<step>.json and <step>/  a Checkpoint and its adapter

Every path is under the tenant, so a tenant reaches only its own records: another tenant's id is
simply not there (404). Ids are checked against their grammar before they touch a path.

One writer per job record at a time: the edge creates it, the runner of its claimed attempt owns it
while it runs, the scheduler takes it back when a run ends. A cancel is its own file, never a
rewrite of the record, so it cannot race the runner's writes. A queued job's cancel and the
scheduler's claim each write their own marker, then read the other's (so at least one of them sees
both, and a cancelled job never starts).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from adapters.errors import RecordNotFoundError, RegistryError, RegistryUnavailableError
from adapters.store.desired_state import ChangeToken
from adapters.store.files import MAX_WEIGHTS_BYTES, read_bounded
from adapters.store.job_records import RECORD_ID, Checkpoint, FileObject, FineTuningJob, JobEvent
from adapters.store.names import PART, check_part
from adapters.store.stores import open_store

ROOT = "finetune"
CHANGES = f"{ROOT}/changes"
CHECKPOINT_FILES = ("adapter_config.json", "adapter_model.safetensors")
_Method = TypeVar("_Method", bound=Callable)
_Record = TypeVar("_Record", bound=BaseModel)


def _reports_io_errors(method: _Method) -> _Method:
    """Store failures (unreachable bucket, permissions) become RegistryUnavailableError (503)."""

    @functools.wraps(method)
    def wrapper(self: JobStore, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OSError as err:
            raise RegistryUnavailableError(f"fine-tuning store: {method.__name__} failed") from err

    return wrapper  # type: ignore[return-value]


def checked_id(record_id: str, kind: str) -> str:
    """`record_id` when it is one of ours of that kind, else 404 (it could name nothing we hold)."""
    if not (isinstance(record_id, str) and RECORD_ID.fullmatch(record_id) and record_id.startswith(kind + "-")):
        raise RecordNotFoundError(f"no {'file' if kind == 'file' else 'fine-tuning job'} '{record_id}'")
    return record_id


class JobStore:
    """Files, jobs, events and checkpoints of every tenant, under `finetune/` of the hub at `url`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._store = open_store(url)
        self.changes = ChangeToken(self._store, url, CHANGES)  # bumped when work appears or is cancelled

    # -- files --

    @_reports_io_errors
    def add_file(self, tenant: str, record: FileObject, content: bytes) -> FileObject:
        base = self._file_dir(tenant, record.id)
        self._store.write(f"{base}/content.jsonl", content)
        self._store.write(f"{base}/file.json", record.model_dump_json().encode())
        return record

    @_reports_io_errors
    def file(self, tenant: str, file_id: str) -> FileObject:
        return self._read(f"{self._file_dir(tenant, checked_id(file_id, 'file'))}/file.json", FileObject,
                          f"no file '{file_id}'")

    @_reports_io_errors
    def file_content(self, tenant: str, file_id: str) -> bytes:
        self.file(tenant, file_id)
        return self._store.read(f"{self._file_dir(tenant, file_id)}/content.jsonl")

    @_reports_io_errors
    def files(self, tenant: str) -> list[FileObject]:
        """The tenant's files, newest first."""
        found = []
        for file_id in self._ids(f"{ROOT}/{check_part(tenant, 'tenant', tenant)}/files"):
            with contextlib.suppress(RecordNotFoundError):  # an upload still in progress
                found.append(self.file(tenant, file_id))
        return sorted(found, key=lambda f: (f.created_at, f.id), reverse=True)

    @_reports_io_errors
    def delete_file(self, tenant: str, file_id: str) -> None:
        self.file(tenant, file_id)
        self._store.remove_tree(self._file_dir(tenant, file_id))

    # -- jobs --

    @_reports_io_errors
    def save_job(self, job: FineTuningJob) -> FineTuningJob:
        self._store.write(f"{self._job_dir(job.tenant, job.id)}/job.json", job.model_dump_json().encode())
        return job

    @_reports_io_errors
    def job(self, tenant: str, job_id: str) -> FineTuningJob:
        return self._read(f"{self._job_dir(tenant, checked_id(job_id, 'ftjob'))}/job.json", FineTuningJob,
                          f"no fine-tuning job '{job_id}'")

    @_reports_io_errors
    def jobs(self, tenant: str) -> list[FineTuningJob]:
        """The tenant's jobs, newest first."""
        found = []
        for job_id in self._ids(f"{ROOT}/{check_part(tenant, 'tenant', tenant)}/jobs"):
            with contextlib.suppress(RecordNotFoundError):
                found.append(self.job(tenant, job_id))
        return sorted(found, key=lambda j: (j.created_at, j.id), reverse=True)

    @_reports_io_errors
    def all_jobs(self) -> list[FineTuningJob]:
        """Every tenant's jobs (the scheduler's view), oldest first."""
        tenants = [name for name in self._store.names(ROOT) if PART.fullmatch(name)]
        return sorted((job for tenant in tenants for job in self.jobs(tenant)), key=lambda j: (j.created_at, j.id))

    @_reports_io_errors
    def request_cancel(self, tenant: str, job_id: str) -> None:
        self._store.write(f"{self._job_dir(tenant, job_id)}/cancel", datetime.now(UTC).isoformat().encode())
        self.changes.bump()

    @_reports_io_errors
    def cancel_requested(self, tenant: str, job_id: str) -> bool:
        return "cancel" in self._store.names(self._job_dir(tenant, job_id))

    @_reports_io_errors
    def claim(self, job: FineTuningJob) -> int:
        """Take the job's next run for this scheduler: its number (1 for the first run). A run claimed by a
        scheduler that was lost before it started keeps its number, so numbers count every claim."""
        claims = f"{self._job_dir(job.tenant, job.id)}/claims"
        attempt = max((int(n) for n in self._store.names(claims) if n.isdigit()), default=0) + 1
        while not self._store.create(f"{claims}/{attempt}", b"claimed"):
            attempt += 1
        return attempt

    @_reports_io_errors
    def claimed(self, tenant: str, job_id: str) -> bool:
        return bool(self._store.names(f"{self._job_dir(tenant, job_id)}/claims"))

    # -- events --

    @_reports_io_errors
    def add_event(self, tenant: str, job_id: str, event: JobEvent) -> JobEvent:
        """Store `event` after the job's others (its `seq` is set here)."""
        events = f"{self._job_dir(tenant, job_id)}/events"
        seq = self._next_number(events)
        while True:  # one writer per job, but a lost worker's last write may race its successor's first
            event = event.model_copy(update={"seq": seq})
            if self._store.create(f"{events}/{seq:08d}.json", event.model_dump_json().encode()):
                return event
            seq += 1

    @_reports_io_errors
    def events(self, tenant: str, job_id: str) -> list[JobEvent]:
        """The job's events, newest first (OpenAI's order)."""
        self.job(tenant, job_id)
        events = f"{self._job_dir(tenant, job_id)}/events"
        names = sorted((n for n in self._store.names(events) if n.endswith(".json") and n[:-5].isdigit()),
                       reverse=True)
        return [self._read(f"{events}/{name}", JobEvent, "event") for name in names]

    # -- checkpoints --

    @_reports_io_errors
    def add_checkpoint(self, tenant: str, checkpoint: Checkpoint, adapter_dir: Path) -> Checkpoint:
        """Store the adapter files first, the record last (the commit point)."""
        base = f"{self._job_dir(tenant, checkpoint.fine_tuning_job_id)}/checkpoints"
        for name in CHECKPOINT_FILES:
            self._store.write(f"{base}/{checkpoint.step_number}/{name}",
                              read_bounded(adapter_dir / name, MAX_WEIGHTS_BYTES))
        self._store.write(f"{base}/{checkpoint.step_number}.json", checkpoint.model_dump_json().encode())
        return checkpoint

    @_reports_io_errors
    def checkpoints(self, tenant: str, job_id: str) -> list[Checkpoint]:
        """The job's checkpoints, newest first."""
        self.job(tenant, job_id)
        base = f"{self._job_dir(tenant, job_id)}/checkpoints"
        steps = sorted((int(n[:-5]) for n in self._store.names(base) if n.endswith(".json") and n[:-5].isdigit()),
                       reverse=True)
        return [self._read(f"{base}/{step}.json", Checkpoint, "checkpoint") for step in steps]

    @_reports_io_errors
    def fetch_checkpoint(self, tenant: str, checkpoint: Checkpoint, dest: Path) -> Path:
        """The checkpoint's adapter files, copied into `dest`."""
        base = f"{self._job_dir(tenant, checkpoint.fine_tuning_job_id)}/checkpoints/{checkpoint.step_number}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in CHECKPOINT_FILES:
            (dest / name).write_bytes(self._store.read(f"{base}/{name}"))
        return dest

    # -- helpers --

    def _file_dir(self, tenant: str, file_id: str) -> str:
        return f"{ROOT}/{check_part(tenant, 'tenant', tenant)}/files/{checked_id(file_id, 'file')}"

    def _job_dir(self, tenant: str, job_id: str) -> str:
        return f"{ROOT}/{check_part(tenant, 'tenant', tenant)}/jobs/{checked_id(job_id, 'ftjob')}"

    def _ids(self, rel: str) -> list[str]:
        return [name for name in self._store.names(rel) if RECORD_ID.fullmatch(name)]

    def _next_number(self, rel: str) -> int:
        numbers = [int(n[:-5]) for n in self._store.names(rel) if n.endswith(".json") and n[:-5].isdigit()]
        return max(numbers, default=-1) + 1

    def _read(self, rel: str, model: type[_Record], missing: str) -> _Record:
        try:
            raw = self._store.read(rel)
        except (FileNotFoundError, NotADirectoryError):
            raise RecordNotFoundError(missing) from None
        try:
            return model.model_validate_json(raw)
        except ValidationError as err:
            raise RegistryError(f"fine-tuning store: corrupt record {rel.rsplit('/', 1)[-1]}: "
                                f"{err.errors()[0]['msg']}") from None

