"""`dcft`: one command, many subcommands. Each handler validates, calls one library
function and prints the answer; errors of ours become one line and exit status 2.

The CLI is the top room: it may import every package, and no package imports it
(docs/architecture.md). Handlers import their library lazily, so `dcft --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from adapters.errors import AdapterError
from cli.adapter import register as register_adapter
from cli.hub import register as register_hub
from cli.jobs import register as register_jobs
from cli.serve import register as register_serving
from cli.train import register as register_training


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dcft", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(required=True, metavar="COMMAND")
    register_adapter(sub)
    register_training(sub)
    register_hub(sub)
    register_jobs(sub)
    register_serving(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except (AdapterError, ValidationError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
