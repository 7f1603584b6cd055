"""The scale-out benchmark end to end, tiny: a random BERT, 20 adapters, a three-node local
Ray cluster (head + two workers), 1 and 2 replicas, with and without adapter-aware routing.

Runs in a subprocess: the benchmark starts and stops its own Ray cluster."""

import json

import pytest

from benchmarks.fixtures import tiny_bert_dir

pytestmark = [pytest.mark.real, pytest.mark.timeout(400)]  # real: the reviews come from the shipped data


def test_scale_benchmark_smoke(tmp_path, ray_benchmark_smoke):
    pytest.importorskip("ray")
    model, out = tiny_bert_dir(tmp_path / "bert", context=512), tmp_path / "results"  # it reads real reviews
    ray_benchmark_smoke("scale", model, out)

    rows = json.loads((out / "scale_smoke.json").read_text())["rows"]
    assert (out / "scale_smoke.md").read_text().startswith("# Scale-out")
    assert [(r["replicas"], r["routing"], r["traffic"]) for r in rows] == [
        (1, "adapter-aware", "uniform"), (1, "adapter-aware", "zipf"),
        (2, "adapter-aware", "uniform"), (2, "adapter-aware", "zipf"),
        (2, "power of two", "uniform"), (2, "power of two", "zipf"),
    ]
    for row in rows:
        assert row["errors"] == 0 and row["requests"] == 40 and row["req_per_s"] > 0, row
        assert row["device_hits"] + row["device_misses"] > 0, row
        assert 0 <= row["device_hit_rate"] <= 1, row
