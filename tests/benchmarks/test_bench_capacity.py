"""The capacity benchmark end to end, tiny: a random BERT, bytes per adapter on disk and in the
host tier (fp32, bf16) measured in a fresh process, 50 adapters resident in one engine, answered."""

import json

import pytest

from benchmarks.capacity import main

pytestmark = pytest.mark.timeout(120)


def test_capacity_benchmark_smoke(tmp_path):
    main(["--smoke", "--out", str(tmp_path)])

    rows = json.loads((tmp_path / "capacity_smoke.json").read_text())["rows"]
    assert (tmp_path / "capacity_smoke.md").read_text().startswith("# Capacity")
    *sizes, run = rows
    assert [(r["measure"], r["dtype"]) for r in sizes] == [
        ("on disk: safetensors + config", "fp32"),
        ("host tier: tensor bytes", "fp32"), ("host tier: RSS growth", "fp32"),
        ("host tier: tensor bytes", "bf16"), ("host tier: RSS growth", "bf16"),
    ]
    for row in sizes:
        assert row["bytes_per_adapter"] > 0 and row["adapters_per_2GiB"] > 0, row
    tensor_bytes = {r["dtype"]: r["bytes_per_adapter"] for r in sizes if r["measure"] == "host tier: tensor bytes"}
    assert tensor_bytes["bf16"] * 2 == tensor_bytes["fp32"]  # the bf16 host tier keeps bf16, not the file's fp32
    # 50 resident, 8 of them on the device: the requests and the check are served from the host tier
    assert run["adapters"] == 50 and run["device_resident"] == 8
    assert run["answered"] == run["requests"] == 3 and run["same_as_alone"] is True
    assert run["request_p99_ms"] >= run["request_p50_ms"] > 0 and run["load_s"] >= 0 and run["publish_s"] > 0
