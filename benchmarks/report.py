"""Write benchmark results as JSON + markdown, with the machine and versions recorded."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).parent / "results"


def environment() -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):  # a learning rate of 2e-05 would round to 0.000
        return f"{value:.3g}" if 0 < abs(value) < 1e-3 else f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [cell(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(name: str, title: str, rows: list[dict], columns: list[str], notes: str = "",
                 out_dir: Path = RESULTS_DIR) -> Path:
    """`<name>.json` (rows + environment) and `<name>.md` (a table) under out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = environment()
    (out_dir / f"{name}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2))
    env_line = ", ".join(f"{k}={v}" for k, v in env.items())
    text = f"# {title}\n\n{notes}\n\n{markdown_table(rows, columns)}\n\nEnvironment: {env_line}\n"
    path = out_dir / f"{name}.md"
    path.write_text(text)
    return path
