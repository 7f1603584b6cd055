"""`dcft jobs create|ls|show|cancel|events`: the fine-tuning routes of a running hub, from a shell.

Every command speaks HTTP to the hub's edge with a tenant's key (`--url`, `--api-key`, or the
DCFT_URL and DCFT_API_KEY environment variables), so it sees what the tenant sees over the API.
`dcft jobs show --plot loss.png` draws the job's training and validation loss from its events.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import httpx

from adapters.errors import AdapterError
from cli.output import print_json

TERMINAL = ("succeeded", "failed", "cancelled")


class Hub:
    """A tenant's view of one hub's edge (base URL with its route prefix, e.g. http://127.0.0.1:8000/lm)."""

    def __init__(self, url: str, key: str | None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=url.rstrip("/") + "/v1", headers=headers, timeout=120)

    def call(self, method: str, path: str, **kwargs) -> dict:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as err:
            raise AdapterError(f"cannot reach the hub at {self.http.base_url}: {err}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise AdapterError(f"{response.status_code}: {message}")
        return response.json()

    def upload(self, path: Path) -> str:
        with path.open("rb") as handle:
            return self.call("POST", "/files", files={"file": (path.name, handle)}, data={"purpose": "fine-tune"})["id"]

    def events(self, job_id: str) -> list[dict]:
        """Every event of the job, oldest first."""
        found, after = [], None
        while True:
            page = self.call("GET", f"/fine_tuning/jobs/{job_id}/events",
                             params={"limit": 100, **({"after": after} if after else {})})
            found += page["data"]
            if not page["has_more"] or not page["data"]:
                return list(reversed(found))
            after = page["data"][-1]["id"]


def hub_of(args: argparse.Namespace) -> Hub:
    return Hub(args.url, args.api_key)


def job_body(args: argparse.Namespace, training: str, validation: str | None) -> dict:
    hyper = {key: value for key, value in (("n_epochs", args.epochs), ("batch_size", args.batch_size),
                                           ("learning_rate_multiplier", args.lr_multiplier)) if value is not None}
    dcft = {key: value for key, value in (("kernel_size", args.kernel_size), ("stride", args.stride),
                                          ("targets", args.targets)) if value is not None}
    body = {"model": args.model, "training_file": training, "validation_file": validation, "suffix": args.suffix,
            "hyperparameters": hyper, "method": {"type": "dcft", "dcft": dcft}}
    return {key: value for key, value in body.items() if value is not None}


def _create(args: argparse.Namespace) -> None:
    hub = hub_of(args)
    training = hub.upload(Path(args.file))
    validation = hub.upload(Path(args.validation_file)) if args.validation_file else None
    job = hub.call("POST", "/fine_tuning/jobs", json=job_body(args, training, validation))
    if args.wait:
        job = follow(hub, job["id"])
    print_json(job)


def follow(hub: Hub, job_id: str) -> dict:
    """Print the job's events as they come until it ends; return the ended job."""
    shown = 0
    while True:
        job = hub.call("GET", f"/fine_tuning/jobs/{job_id}")
        events = hub.events(job_id)
        for event in events[shown:]:
            print(event["message"])
        shown = len(events)
        if job["status"] in TERMINAL:
            return job
        time.sleep(1)


def _ls(args: argparse.Namespace) -> None:
    jobs = hub_of(args).call("GET", "/fine_tuning/jobs", params={"limit": args.limit})["data"]
    print(f"{'job':<31} {'status':<10} {'model':<12} {'created':<16} fine_tuned_model")
    for job in jobs:
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(job["created_at"]))
        print(f"{job['id']:<31} {job['status']:<10} {job['model'][:12]:<12} {created:<16} "
              f"{job['fine_tuned_model'] or '-'}")


def _show(args: argparse.Namespace) -> None:
    hub = hub_of(args)
    job = hub.call("GET", f"/fine_tuning/jobs/{args.job}")
    if args.plot:
        plot_loss(hub.events(args.job), Path(args.plot), job)
        print(f"wrote the loss curve to {args.plot}")
    print_json(job)


def _cancel(args: argparse.Namespace) -> None:
    print_json(hub_of(args).call("POST", f"/fine_tuning/jobs/{args.job}/cancel"))


def _events(args: argparse.Namespace) -> None:
    for event in hub_of(args).events(args.job):
        created = time.strftime("%H:%M:%S", time.localtime(event["created_at"]))
        print(f"{created} {event['level']:<5} {event['message']}")


def loss_curves(events: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """(step, loss) of training and validation, from the metrics events."""
    curves: dict[str, list[tuple[int, float]]] = {"train_loss": [], "valid_loss": []}
    for event in events:
        data = event.get("data") or {}
        for name, points in curves.items():
            if name in data:
                points.append((int(data["step"]), float(data[name])))
    return curves


def plot_loss(events: list[dict], path: Path, job: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AdapterError("--plot needs matplotlib: pip install matplotlib") from None
    curves = loss_curves(events)
    if not curves["train_loss"]:
        raise AdapterError(f"job {job['id']} has no loss to plot yet (status {job['status']})")
    figure, axes = plt.subplots(figsize=(6, 3.5))
    for name, label in (("train_loss", "training"), ("valid_loss", "validation")):
        if curves[name]:
            steps, values = zip(*curves[name], strict=True)
            axes.plot(steps, values, marker="o" if name == "valid_loss" else None, label=label)
    axes.set(xlabel="step", ylabel="loss", title=f"{job['id']} ({job['status']})")
    axes.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def register(sub: argparse._SubParsersAction) -> None:
    jobs = sub.add_parser("jobs", help="fine-tuning jobs on a running hub (OpenAI's fine-tuning API)")
    jobs.add_argument("--url", default=os.environ.get("DCFT_URL", "http://127.0.0.1:8000"),
                      help="the hub's base URL with its route prefix; or set DCFT_URL")
    jobs.add_argument("--api-key", default=os.environ.get("DCFT_API_KEY"), help="a tenant's key; or set DCFT_API_KEY")
    verbs = jobs.add_subparsers(required=True, metavar="VERB")

    p = verbs.add_parser("create", help="upload the file(s) and start a job")
    p.add_argument("--model", required=True, help="the hub's backbone (what /v1/models lists first)")
    p.add_argument("--file", required=True, help="training JSONL: chat, prompt/completion, or text/label")
    p.add_argument("--validation-file")
    p.add_argument("--suffix", help="the task name: the result is published as TENANT/SUFFIX@N")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr-multiplier", type=float)
    p.add_argument("--kernel-size", type=int)
    p.add_argument("--stride", type=int)
    p.add_argument("--targets", nargs="+")
    p.add_argument("--wait", action="store_true", help="print the events until the job ends")
    p.set_defaults(handler=_create)

    p = verbs.add_parser("ls", help="this tenant's jobs, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(handler=_ls)

    p = verbs.add_parser("show", help="one job; --plot writes its loss curve as a PNG")
    p.add_argument("job")
    p.add_argument("--plot", help="PNG path for the training and validation loss")
    p.set_defaults(handler=_show)

    p = verbs.add_parser("cancel", help="stop a job (it publishes nothing)")
    p.add_argument("job")
    p.set_defaults(handler=_cancel)

    p = verbs.add_parser("events", help="a job's events, oldest first")
    p.add_argument("job")
    p.set_defaults(handler=_events)
