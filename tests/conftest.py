"""Pytest fixtures shared by the suite. Helpers that build things live in `benchmarks.fixtures`."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import settings

from benchmarks.fixtures import TINY_MODELS

# The fuzzers draw a fixed sequence of cases by default, so a run passes or fails the same way every time
# (a new case found at random would fail CI at random); HYPOTHESIS_PROFILE=explore draws new ones.
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fixed"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where tests build models and inputs: the GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model(request, device) -> torch.nn.Module:
    torch.manual_seed(0)
    return TINY_MODELS[request.param]().to(device)


@pytest.fixture(scope="session")
def minilm_dir():
    from backbones.shipped import MINILM, resolve_model_dir

    return resolve_model_dir(MINILM)


@pytest.fixture
def ray_benchmark_smoke() -> Callable[[str, Path, Path], None]:
    """Runs `python -m benchmarks.<module> --smoke` in a subprocess: a benchmark that starts and
    stops its own Ray cluster and sets its replicas' environment must not touch this session."""

    def run(module: str, model_dir: Path, out: Path) -> None:
        command = [sys.executable, "-m", f"benchmarks.{module}", "--smoke"]
        command += ["--model", str(model_dir), "--out", str(out)]
        env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
        root = Path(__file__).resolve().parents[1]
        done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=360)
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    return run
