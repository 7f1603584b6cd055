"""The HTTP serving benchmark end to end, tiny: a random BERT, 1 and 3 adapters, 20 requests
per point, both apps (dcft-hub and the Ray multiplexing baseline) on 127.0.0.1.

Runs in a subprocess: the benchmark starts and stops its own Ray cluster and sets
environment variables for its replicas, none of which should leak into this session.
"""

import json

import pytest

from benchmarks.fixtures import tiny_bert_dir

pytestmark = [pytest.mark.real, pytest.mark.timeout(400)]  # real: the reviews come from the shipped data


def test_serving_benchmark_smoke(tmp_path, ray_benchmark_smoke):
    pytest.importorskip("ray")
    model, out = tiny_bert_dir(tmp_path / "bert", context=512), tmp_path / "results"  # it reads real reviews
    ray_benchmark_smoke("serving", model, out)

    rows = json.loads((out / "serving_smoke.json").read_text())["rows"]
    assert (out / "serving_smoke.md").read_text().startswith("# Serving over HTTP")
    assert [(r["system"].split(" ")[0], r["adapters"]) for r in rows] == [
        ("dcft-hub", 1), ("ray-multiplex", 1), ("dcft-hub", 3), ("ray-multiplex", 3)
    ]
    for row in rows:
        assert row["errors"] == 0 and row["warmup_errors"] == 0, row
        assert row["requests"] == 20 and row["req_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
    ours = [r for r in rows if r["system"] == "dcft-hub"]
    assert ours[0]["ratio_vs_single"] == 1.0 and all(r["ratio_vs_multiplex"] > 0 for r in ours)
