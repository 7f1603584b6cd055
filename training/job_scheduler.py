"""Fine-tuning jobs on the Ray cluster: a bounded, fair queue that starts each job as a Ray task with
its own resource request (a GPU where the cluster has them, else CPUs), never in a serving replica.

The queue is the hub's store itself (adapters/store/jobs.py): the HTTP edge writes a job
`validating_files`, and the scheduler, one Serve deployment of its own (`deploy`) so Serve restarts it if
it dies, polls:

- validate: a job's files checked against the backbone's task and each other, then `queued`, or
  `failed` naming the file and its bad lines (training/job_runner.py `validate_job`); here rather than
  in the edge, so a job whose edge went away mid-check is still checked;
- start: the oldest queued job of the tenant with the fewest jobs running, while the cluster runs fewer
  than `max_running` and that tenant fewer than `max_running_per_tenant` (claimed first, so a job
  cancelled while queued never starts);
- cancel: a running job sees its cancel within a step and stops; one still running `cancel_grace_s`
  later is killed, which frees its resources all the same;
- lost runs: a job whose task died with its worker or node, or that was left `running` by a scheduler
  that is gone (its tasks went with it), goes back to the queue and resumes from its last checkpoint,
  up to `max_attempts` runs; then it is `failed` with the reason. Nothing stays `running` forever.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import ray
from ray import serve

from adapters.errors import RegistryError
from adapters.store.job_records import FineTuningConfig, FineTuningJob, JobError, JobEvent
from adapters.store.jobs import JobStore
from backbones.shipped import resolve_model_dir
from training.job_runner import backbone_task, finish, run_job, validate_job

logger = logging.getLogger(__name__)

APP_NAME = "fine-tuning"
RESCAN_S = 5.0  # a full look at every job even when no change token moved


@ray.remote(max_retries=0)  # a lost run is the scheduler's to resume, from its checkpoint
def job_task(hub_url: str, model: str, tenant: str, job_id: str, attempt: int, config: dict, threads: int) -> str:
    import torch

    torch.set_num_threads(threads)
    return run_job(hub_url, model, tenant, job_id, attempt, FineTuningConfig.model_validate(config))


@dataclass
class Run:
    job: FineTuningJob
    store: JobStore
    ref: ray.ObjectRef
    cancel_seen: float | None = None
    killed: bool = False


class JobScheduler:
    """Starts, watches and recovers the jobs of every hub it serves (hub URL -> its backbone)."""

    def __init__(self, hubs: dict[str, str], config: FineTuningConfig):
        self.models, self.config = hubs, config
        self.stores = {url: JobStore(url) for url in hubs}
        self.runs: dict[str, Run] = {}
        self._tokens: dict[str, str | None] = {}
        self._queued: dict[str, list[FineTuningJob]] = {url: [] for url in hubs}
        self._tasks: dict[str, str] = {}
        self._scanned = 0.0

    def step(self) -> None:
        self.reap()
        self.watch_cancels()
        if self._changed():
            for url, store in self.stores.items():
                self._queued[url] = self.scan(store)
        self.start_queued()

    def _changed(self) -> bool:
        tokens = {url: _token(store) for url, store in self.stores.items()}
        due = time.monotonic() - self._scanned > RESCAN_S or tokens != self._tokens
        if due:
            self._tokens, self._scanned = tokens, time.monotonic()
        return due

    def scan(self, store: JobStore) -> list[FineTuningJob]:
        """The hub's queued jobs, oldest first, after validating new ones; a job left running by no live run
        is recovered."""
        queued = []
        for job in store.all_jobs():
            if job.status == "validating_files":
                job = validate_job(store, job, self.config, self.task_of(store.url))
            if job.status == "running" and job.id not in self.runs:
                job = self.lost(store, job, "its scheduler was restarted while it ran")
            if job.status == "queued" and job.id not in self.runs:
                if store.cancel_requested(job.tenant, job.id):
                    finish(store, job, "cancelled")
                else:
                    queued.append(job)
        return queued

    def task_of(self, url: str) -> str:
        """The hub's backbone task (causal_lm or seq_cls), read from its config once."""
        if url not in self._tasks:
            self._tasks[url] = backbone_task(resolve_model_dir(self.models[url]))
        return self._tasks[url]

    def start_queued(self) -> None:
        while len(self.runs) < self.config.max_running and (picked := self.pick()):
            url, job = picked
            self._queued[url].remove(job)
            self.start(url, job)

    def pick(self) -> tuple[str, FineTuningJob] | None:
        """The oldest queued job of the tenant running fewest (fair between tenants)."""
        running: dict[str, int] = {}
        for run in self.runs.values():
            running[run.job.tenant] = running.get(run.job.tenant, 0) + 1
        waiting = [(running.get(job.tenant, 0), job.created_at, job.id, url, job)
                   for url, jobs in self._queued.items() for job in jobs
                   if running.get(job.tenant, 0) < self.config.max_running_per_tenant]
        return min(waiting, key=lambda item: item[:3])[3:] if waiting else None

    def start(self, url: str, job: FineTuningJob) -> None:
        store = self.stores[url]
        attempt = store.claim(job)
        if store.cancel_requested(job.tenant, job.id):  # after the claim: see adapters/store/jobs.py
            finish(store, job, "cancelled")
            return
        options, threads = self.resources()
        ref = job_task.options(**options).remote(url, self.models[url], job.tenant, job.id, attempt,
                                                 self.config.model_dump(), threads)
        self.runs[job.id] = Run(job, store, ref)
        logger.info("fine-tuning job %s of %s: run %d started", job.id, job.tenant, attempt)

    def resources(self) -> tuple[dict, int]:
        """A GPU where the cluster has them, else CPUs; the task's torch uses that many threads."""
        if ray.cluster_resources().get("GPU", 0) > 0 and self.config.job_num_gpus > 0:
            return {"num_gpus": self.config.job_num_gpus, "num_cpus": 1}, 1
        cpus = self.config.job_num_cpus
        return {"num_cpus": cpus}, max(1, int(cpus))

    def reap(self) -> None:
        if not self.runs:
            return
        refs = [run.ref for run in self.runs.values()]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for run in [run for run in self.runs.values() if run.ref in done]:
            del self.runs[run.job.id]
            try:
                ray.get(run.ref)  # the runner recorded the job's end itself
            except Exception as err:  # noqa: BLE001 - the task, its worker or its node is gone
                job = run.store.job(run.job.tenant, run.job.id)
                if job.done:
                    continue
                if run.killed:
                    finish(run.store, job, "cancelled")
                else:
                    self.lost(run.store, job, f"its worker was lost ({type(err).__name__})")

    def watch_cancels(self) -> None:
        for run in self.runs.values():
            if run.killed or not run.store.cancel_requested(run.job.tenant, run.job.id):
                continue
            run.cancel_seen = run.cancel_seen or time.monotonic()
            if time.monotonic() - run.cancel_seen > self.config.cancel_grace_s:
                ray.cancel(run.ref, force=True)  # not stopped by itself: its resources are freed all the same
                run.killed = True

    def lost(self, store: JobStore, job: FineTuningJob, why: str) -> FineTuningJob:
        """Back to the queue to resume from the last checkpoint, or failed once the runs are spent."""
        if job.attempts < self.config.max_attempts:
            store.add_event(job.tenant, job.id, JobEvent(level="warn", message=f"The job stopped: {why}; it is "
                                                         "queued again and resumes from its last checkpoint"))
            return store.save_job(job.model_copy(update={"status": "queued"}))
        error = JobError(code="worker_lost", message=f"the job stopped after {job.attempts} runs: {why}")
        return finish(store, job, "failed", error=error)

    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.step()
            except Exception:  # a store hiccup: the next poll tries again
                logger.exception("fine-tuning scheduler poll failed")
            stop.wait(self.config.poll_interval_s)


@serve.deployment(name="FineTuningScheduler", num_replicas=1, ray_actor_options={"num_cpus": 0},
                  health_check_period_s=5)
class FineTuningScheduler:
    """The scheduler as a Serve deployment of its own: Serve keeps one running and replaces it if it dies."""

    def __init__(self, hubs: dict[str, str], config: dict):
        self.scheduler = JobScheduler(hubs, FineTuningConfig.model_validate(config))
        self._stop = threading.Event()
        self._loop = threading.Thread(target=self.scheduler.run_forever, args=(self._stop,), daemon=True)
        self._loop.start()

    def check_health(self) -> None:
        if not self._loop.is_alive():
            raise RuntimeError("the fine-tuning scheduler's loop stopped")

    def running(self) -> list[str]:
        return sorted(self.scheduler.runs)

    def __del__(self):
        self._stop.set()


def deploy(hubs: dict[str, str], config: FineTuningConfig | None = None, name: str = APP_NAME) -> str:
    """Run the scheduler for `hubs` (hub URL or path -> backbone alias or folder) on the connected cluster,
    as the Serve application `name` (no HTTP route); return the name."""
    absolute = {_absolute(url): _absolute(model) if Path(model).exists() else model for url, model in hubs.items()}
    app = FineTuningScheduler.bind(absolute, (config or FineTuningConfig()).model_dump())
    serve.run(app, name=name, route_prefix=None)
    return name


def _absolute(location: str) -> str:
    return location if "://" in location else os.fspath(Path(location).resolve())


def _token(store: JobStore) -> str | None:
    """The store's change token; None while it cannot be read (the periodic rescan still runs)."""
    try:
        return store.changes.read()
    except RegistryError:
        return None
