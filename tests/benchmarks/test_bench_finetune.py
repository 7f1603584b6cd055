"""The fine-tuning benchmark end to end, tiny: a random Llama served with the scheduler beside it on a local
Ray cluster (upload to first token, serving beside a job), and a random BERT's job against `dcft train`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)


def test_finetune_benchmark_smoke(tmp_path):
    pytest.importorskip("ray")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # its own process: the benchmark starts and stops its own Ray cluster
    done = subprocess.run([sys.executable, "-m", "benchmarks", "finetune", "--smoke", "--out", str(tmp_path)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    rows = json.loads((tmp_path / "finetune_smoke.json").read_text())["rows"]
    (first,) = [r for r in rows if r["part"] == "a"]
    assert first["seconds"] > first["running_s"] > 0 and first["job_steps"] == 2
    stages = ("upload_s", "create_s", "waiting_s", "running_s", "first_token_s")
    assert sum(first[s] for s in stages) == pytest.approx(first["seconds"], abs=0.05)
    overhead = [r for r in rows if r["part"] == "b"]
    assert [r["variant"] for r in overhead] == ["dcft train", "job"]
    assert overhead[0]["job_steps"] == overhead[1]["job_steps"] == 2  # the same training: 32 reviews, batch 16
    assert overhead[1]["vs_reference"] > 0
    serving = [r for r in rows if r["part"] == "c"]
    assert [r["variant"] for r in serving] == ["none", "a job training"]
    assert all(r["requests_per_s"] > 0 and r["tokens_per_s"] > 0 and r["errors"] == 0 for r in serving), serving
    assert serving[1]["job_steps"] >= 1 and serving[1]["vs_reference"] > 0
    report = (tmp_path / "finetune_smoke.md").read_text()
    assert report.startswith("# Fine-tuning as a service") and "## (b) A job's training against `dcft train`" in report
