"""The generation benchmark end to end, tiny: a random Llama served over HTTP on 127.0.0.1,
streaming completions under open-loop Poisson arrivals, static vs continuous batching."""

import json

import pytest

from benchmarks.fixtures import tiny_llama_dir

pytestmark = pytest.mark.timeout(400)


def test_generation_benchmark_smoke(tmp_path, ray_benchmark_smoke):
    pytest.importorskip("ray")
    model, out = tiny_llama_dir(tmp_path / "llama"), tmp_path / "results"
    ray_benchmark_smoke("generation", model, out)

    report = json.loads((out / "generation_smoke.json").read_text())
    rows = report["rows"]
    assert sorted({r["mode"] for r in rows}) == ["continuous", "static"]
    assert len({r["offered_rps"] for r in rows}) == 2 and len(rows) == 4
    for row in rows:
        assert row["sent"] > 0 and row["errors"] == 0 and row["unfinished"] == 0, row
        assert row["completed"] == row["sent"] and row["output_tok_s"] > 0, row
        assert row["ttft_p99_ms"] >= row["ttft_p50_ms"] > 0, row
    for row in (r for r in rows if r["mode"] == "continuous"):
        assert row["itl_p99_ms"] >= row["itl_p50_ms"] >= 0, row  # streamed token by token
    assert "saturating_rps" in report["verdict"]
    assert (out / "generation_smoke.md").read_text().count("| static |") == 2
