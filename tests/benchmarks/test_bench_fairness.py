"""The fairness benchmark end to end, tiny: a random BERT served over HTTP on 127.0.0.1,
a victim tenant measured alone and under two flooding tenants (one under a quota)."""

import json

import pytest

from benchmarks.fixtures import tiny_bert_dir

pytestmark = pytest.mark.timeout(400)


def test_fairness_benchmark_smoke(tmp_path, ray_benchmark_smoke):
    pytest.importorskip("ray")
    model, out = tiny_bert_dir(tmp_path / "bert"), tmp_path / "results"
    ray_benchmark_smoke("fairness", model, out)

    rows = json.loads((out / "fairness_smoke.json").read_text())["rows"]
    assert [r["phase"] for r in rows] == [
        "alone", "flooded, no quota", "flooded, quota 4 in flight, 429s ignored",
        "flooded, quota 4 in flight, Retry-After honoured",
    ]
    assert rows[0]["p50_vs_alone"] == 1.0 and all(r["victim_p50_ms"] > 0 for r in rows)
    open_flood, ignoring, polite = rows[1:]
    assert open_flood["flood_429"] == 0 and open_flood["flood_200"] > 0 and open_flood["flood_other"] == 0
    assert ignoring["flood_429"] > 0 and ignoring["flood_other"] == 0, "8 clients against a limit of 4"
    assert polite["flood_200"] > 0 and polite["flood_other"] == 0
