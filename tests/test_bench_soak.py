"""The soak end to end, tiny: a random BERT behind the real Serve app, 10 s of traffic with
hot swaps, every answer checked against its adapter version run alone. In a subprocess:
the soak starts and stops its own Ray cluster."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import tiny_bert_dir

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.slow, pytest.mark.real, pytest.mark.timeout(400)]  # real: the reviews are shipped data


def test_soak_smoke_answers_right_through_hot_swaps(tmp_path):
    pytest.importorskip("ray")
    model, out = tiny_bert_dir(tmp_path / "bert"), tmp_path / "results"
    command = [sys.executable, "-m", "benchmarks.soak", "--smoke", "--model", str(model), "--out", str(out)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    row = json.loads((out / "soak_smoke.json").read_text())["rows"][0]
    assert row["requests"] > 0 and row["right"] == row["requests"]
    assert row["wrong"] == 0 and row["failed"] == 0 and row["warmup_failed"] == 0
    assert row["swaps_published"] >= 2 and row["adapter_versions_served"] > 9
    assert row["rss_start_mib"] > 0
