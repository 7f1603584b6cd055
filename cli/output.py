"""How every `dcft` command prints machine-readable answers."""

from __future__ import annotations

import json


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2, default=str))
