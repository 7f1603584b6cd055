"""The protocol's finished runs, kept in one JSON file that every run is saved to as it finishes."""

from __future__ import annotations

import json
from pathlib import Path

from adapters.store.atomic import write_atomic


class RunStore:
    """Finished runs by key, saved after every run; `--resume` starts from the saved file."""

    def __init__(self, path: Path, resume: bool):
        self.path = path
        saved = json.loads(path.read_text()) if resume and path.exists() else {"runs": []}
        self.runs: list[dict] = saved["runs"]

    @staticmethod
    def key(**fields) -> str:
        return json.dumps(fields, sort_keys=True, default=str)

    def get(self, key: str) -> dict | None:
        return next((r for r in self.runs if r["key"] == key), None)

    def add(self, key: str, row: dict) -> dict:
        self.runs.append({"key": key, **row})
        self.save()
        return self.runs[-1]

    def merge(self, other: Path) -> int:
        """The runs of another store's file that this one lacks; returns how many were added."""
        if not other.exists():
            return 0
        known = {r["key"] for r in self.runs}
        new = [r for r in json.loads(other.read_text())["runs"] if r["key"] not in known]
        if new:
            self.runs += new
            self.save()
        return len(new)

    def save(self) -> None:
        # whole or not at all: a merging parent or a resumed run never reads half a file
        write_atomic(self.path, json.dumps({"runs": self.runs}, indent=2).encode())
