"""`dcft serve` (the Serve app on this machine) and `dcft demo` (the whole workflow)."""

from __future__ import annotations

import argparse
import json
import signal
import threading
from pathlib import Path


def serve_config_from(args: argparse.Namespace):
    from serving.config import ServeConfig

    raw = json.loads(Path(args.config).read_text()) if args.config else {}
    engine = raw.setdefault("engine", {})
    for flag, field in (("model", "model"), ("hub", "hub"), ("device", "device"), ("kernel_size", "kernel_size"),
                        ("mode", "mode"), ("adapter", "merged_adapter")):
        if getattr(args, flag) is not None:
            engine[field] = getattr(args, flag)
    for flag in ("host", "port", "api_keys_file"):
        if getattr(args, flag) is not None:
            raw[flag] = getattr(args, flag)
    return ServeConfig.model_validate(raw)


def _serve(args: argparse.Namespace) -> None:
    from serving.launch import ClusterClashError, start, stop

    config = serve_config_from(args)
    names = {args.route_prefix: args.app_name} if args.app_name else None
    asked_to_stop = stop_signals()  # before the app answers: a SIGTERM from then on drains it
    try:
        base = start({args.route_prefix: config}, config.host, config.port, names=names)
    except ClusterClashError as err:
        raise SystemExit(f"dcft serve: {err}") from None
    print(f"serving {config.engine.model} adapters from {config.engine.hub} at {base}{args.route_prefix.rstrip('/')}")
    scheduler = _start_fine_tuning(config, args.app_name)
    print("Ctrl-C or SIGTERM to stop (running requests get up to "
          f"{config.limits.drain_timeout_s:g} s to finish; Ctrl-C twice stops at once)", flush=True)
    try:
        while not asked_to_stop.wait(timeout=1):  # a timed wait: signals reach the main thread between waits
            pass
        drain_then_report()
    except KeyboardInterrupt:
        pass
    finally:
        if scheduler:
            from ray import serve

            serve.delete(scheduler)  # on a shared cluster the other apps keep running
        stop()


def _start_fine_tuning(config, app_name: str | None) -> str | None:
    """The fine-tuning scheduler beside the app: jobs from the hub's store run as Ray tasks on this cluster."""
    if config.fine_tuning is None:
        return None
    from training.job_scheduler import APP_NAME, deploy

    name = deploy({config.engine.hub: config.engine.model}, config.fine_tuning,
                  name=f"{APP_NAME}-{app_name}" if app_name else APP_NAME)
    print(f"fine-tuning jobs from {config.engine.hub} run on this Ray cluster ({name})")
    return name


def stop_signals() -> threading.Event:
    """An event set by the first SIGTERM or Ctrl-C; a second Ctrl-C then interrupts the drain."""
    asked = threading.Event()

    def on_signal(signum, _frame):
        asked.set()
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return asked


def drain_then_report() -> None:
    from serving.launch import drain

    print("draining: new requests get 503; running ones may finish", flush=True)
    for app, outcome in drain().items():
        cut = outcome["ended_by_bound"] + outcome["still_running"]
        print(f"app {app}: drained" + (f"; {cut} requests ended at the drain bound" if cut else "")
              + (f"; {outcome['unanswered']} Ingress replicas did not answer" if outcome["unanswered"] else ""),
              flush=True)


def _demo(args: argparse.Namespace) -> None:
    from cli.demo import run_demo

    run_demo(Path(args.work_dir), args.port, with_lm=not args.no_lm)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the Serve app on this machine (127.0.0.1 by default)")
    p.add_argument("--config", help="JSON file holding a ServeConfig; flags override it")
    p.add_argument("--model", help="backbone folder or alias (minilm, smollm2)")
    p.add_argument("--hub", help="adapter hub path or URL")
    p.add_argument("--device", help="cuda or cpu")
    p.add_argument("--kernel-size", type=int)
    p.add_argument("--mode", choices=["mixed", "merged"])
    p.add_argument("--adapter", help="the adapter a merged replica serves")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--api-keys-file", help='JSON {"key": "tenant"}; or set DCFT_API_KEYS')
    p.add_argument("--route-prefix", default="/", help="where this app answers (each app on a cluster has its own)")
    p.add_argument("--app-name", help="the Serve application's name (default: the backbone's name)")
    p.set_defaults(handler=_serve)

    p = sub.add_parser("demo", help="train on real data, publish, serve over HTTP, query, shut down")
    p.add_argument("--work-dir", default="dcft-demo")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-lm", action="store_true", help="skip the SmolLM2 completion part")
    p.set_defaults(handler=_demo)
