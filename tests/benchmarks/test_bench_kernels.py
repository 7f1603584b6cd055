"""The kernel benchmark end to end, tiny: under Triton's interpreter (its own subprocess), every variant
runs and agrees with the torch path. Its times mean nothing; the real run needs CUDA."""

import importlib.util
import json

import pytest

from benchmarks import kernels as kernels_bench


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernel_benchmark_smoke(tmp_path):
    kernels_bench.main(["--smoke", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "kernels_smoke.json").read_text())
    rows = report["rows"]
    assert len(rows) == 4 and all(r["torch_x"] > 0 and r["triton-fused_x"] > 0 for r in rows)
    assert all(float(r["expand_err"]) < 1e-4 and float(r["fused_err"]) < 1e-4 for r in rows)
    assert "MISMATCH" not in (tmp_path / "kernels_smoke.md").read_text()
