"""The quality benchmark end to end, tiny: a few examples, one trial per family it smokes."""

import json

import pytest


@pytest.mark.real
def test_quality_benchmark_smoke(tmp_path):
    from benchmarks import quality

    quality.main(["--smoke", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "quality_smoke.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"head only", "DCFT k8", "LoRA r1"}
    assert (tmp_path / "quality_smoke.png").stat().st_size > 1000
