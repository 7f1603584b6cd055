"""The load-latency benchmark end to end, tiny: a random BERT at N = 1 and 10, our bank and merged
paths and PEFT LoRA r1/r8 (load, load+merge), every point measured with positive numbers."""

import json

import pytest

from benchmarks.load import BANK, MERGED, main

pytestmark = pytest.mark.timeout(120)


def test_load_benchmark_smoke(tmp_path):
    main(["--smoke", "--out", str(tmp_path)])

    rows = json.loads((tmp_path / "load_smoke.json").read_text())["rows"]
    assert (tmp_path / "load_smoke.md").read_text().startswith("# Adapter load latency")
    assert (tmp_path / "load_smoke.png").stat().st_size > 0
    peft = [f"PEFT LoRA r{rank} {kind}" for rank in (1, 8) for kind in ("load", "load+merge")]
    points = {(r["system"], r["resident"]) for r in rows}
    assert points == {(BANK, 1), (BANK, 10), (MERGED, 1)} | {(system, n) for system in peft for n in (1, 10)}
    for row in rows:
        assert row["samples"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0 and row["mean_ms"] > 0, row
