"""The soak end to end, tiny: a random BERT behind the real Serve app, 10 s of traffic with
hot swaps, every answer checked against its adapter version run alone. In a subprocess:
the soak starts and stops its own Ray cluster."""

import json

import pytest

from benchmarks.fixtures import tiny_bert_dir

pytestmark = [pytest.mark.slow, pytest.mark.real, pytest.mark.timeout(400)]  # real: the reviews are shipped data


def test_soak_smoke_answers_right_through_hot_swaps(tmp_path, ray_benchmark_smoke):
    pytest.importorskip("ray")
    model, out = tiny_bert_dir(tmp_path / "bert", context=512), tmp_path / "results"  # it reads real reviews
    ray_benchmark_smoke("soak", model, out)

    row = json.loads((out / "soak_smoke.json").read_text())["rows"][0]
    assert row["requests"] > 0 and row["right"] == row["requests"]
    assert row["wrong"] == 0 and row["failed"] == 0 and row["warmup_failed"] == 0
    assert row["swaps_published"] >= 2 and row["adapter_versions_served"] > 9
    assert row["rss_start_mib"] > 0
