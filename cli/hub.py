"""`dcft publish` and `dcft hub ls|show|rm|placements`: thin edges over `AdapterHub`."""

from __future__ import annotations

import argparse
import os

from adapters.store.hub import AdapterHub
from cli.output import print_json

DEFAULT_HUB = os.environ.get("DCFT_HUB", "hub")


def _print_versions(versions) -> None:
    print(f"{'adapter':<32} {'version':>7} {'size':>9}  {'digest':<14} created")
    for v in versions:
        print(f"{v.name:<32} {v.version:>7} {v.size_bytes:>9,}  {v.digest[:12]:<14} {v.created_at:%Y-%m-%d %H:%M}")


def _publish(args: argparse.Namespace) -> None:
    version = AdapterHub(args.hub).publish(args.adapter_dir, args.name)
    print(f"published {version.ref} ({version.digest[:12]}, {version.size_bytes:,} bytes) to {args.hub}")


def _ls(args: argparse.Namespace) -> None:
    _print_versions(AdapterHub(args.hub).list(args.tenant, all_versions=args.all))


def _show(args: argparse.Namespace) -> None:

    hub = AdapterHub(args.hub)
    version = hub.resolve(args.ref)
    print_json(
        {"version": version.model_dump(mode="json"), "versions": [v.version for v in hub.versions(version.name)]}
    )


def _rm(args: argparse.Namespace) -> None:
    for version in AdapterHub(args.hub).remove(args.ref):
        print(f"removed {version.ref}")


def _placements(args: argparse.Namespace) -> None:
    print(f"{'adapter':<32} {'state':<9} {'ref':<36} changed")
    for name, p in AdapterHub(args.hub).fleet.all().items():
        print(f"{name:<32} {p.state:<9} {p.ref:<36} {p.changed_at:%Y-%m-%d %H:%M}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("publish", help="publish an adapter directory as TENANT/TASK@N")
    p.add_argument("adapter_dir")
    p.add_argument("--name", required=True, help="TENANT/TASK")
    p.add_argument("--hub", default=DEFAULT_HUB, help="hub path or URL (default: $DCFT_HUB or ./hub)")
    p.set_defaults(handler=_publish)

    hub = sub.add_parser("hub", help="list, show and remove published adapters; the serving placements")
    hub_sub = hub.add_subparsers(required=True, metavar="ACTION")
    p = hub_sub.add_parser("ls", help="latest version of each adapter")
    p.add_argument("--tenant")
    p.add_argument("--all", action="store_true", help="every version")
    p.set_defaults(handler=_ls)
    p = hub_sub.add_parser("show", help="one version's record")
    p.add_argument("ref", help="TENANT/TASK[@N]")
    p.set_defaults(handler=_show)
    p = hub_sub.add_parser("rm", help="remove a version (TENANT/TASK@N) or all (TENANT/TASK)")
    p.add_argument("ref")
    p.set_defaults(handler=_rm)
    p = hub_sub.add_parser("placements", help="what every serving replica is asked to hold (admin load/pin/unload)")
    p.set_defaults(handler=_placements)
    for parser in (p for p in hub_sub.choices.values()):
        parser.add_argument("--hub", default=DEFAULT_HUB, help="hub path or URL")
