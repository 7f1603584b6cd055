"""The whole-model throughput benchmark end to end, tiny: random BERT and Llama, every system and
distinct count present in the report with positive numbers, and the over-batch count capped."""

import json

import pytest

from benchmarks.forward import SYSTEMS, main

pytestmark = pytest.mark.timeout(120)


def test_forward_benchmark_smoke(tmp_path):
    main(["--smoke", "--out", str(tmp_path)])

    rows = json.loads((tmp_path / "forward_smoke.json").read_text())["rows"]
    assert (tmp_path / "forward_smoke.md").read_text().startswith("# Whole-model throughput")
    assert (tmp_path / "forward_smoke.png").stat().st_size > 0
    workloads = ["minilm classify", "smollm2 prefill", "smollm2 decode"]
    expected = [(w, s, d) for w in workloads for s in SYSTEMS for d in ([0] if s == "bare" else [1, 4])]
    assert [(r["workload"], r["system"], r["distinct"]) for r in rows] == expected
    for row in rows:
        assert row["ms_per_run"] > 0 and row["tokens_per_s"] > 0 and row["vs_bare"] > 0, row
        assert (row["dcft_vs_lora"] > 0) if row["system"] == "dcft" else row["dcft_vs_lora"] is None
        assert row["asked"] == ("8" if row["distinct"] == 4 else None)  # 8 distinct asked, 4 rows per batch


def test_forward_benchmark_takes_a_dtype_and_a_kernel_switch(tmp_path):
    from adapters import kernels

    before = kernels.mode()
    main(["--smoke", "--dtype", "bfloat16", "--kernels", "torch", "--workloads", "classify", "--out", str(tmp_path)])

    text = (tmp_path / "forward_smoke.md").read_text()
    assert "bfloat16, DCFT's CUDA kernels: torch" in text
    rows = json.loads((tmp_path / "forward_smoke.json").read_text())["rows"]
    assert rows and all(row["workload"] == "minilm classify" and row["ms_per_run"] > 0 for row in rows)
    assert kernels.mode() == before  # the switch is undone after the run
