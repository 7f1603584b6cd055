"""The training-step benchmark end to end on a tiny random BERT: three variants, positive times,
DCFT and its dense twin training the same parameters."""

import json

import pytest

from benchmarks.train_step import main

pytestmark = pytest.mark.timeout(120)


def test_train_step_benchmark_smoke(tmp_path):
    main(["--smoke", "--out", str(tmp_path)])

    rows = {r["system"]: r for r in json.loads((tmp_path / "train_step_smoke.json").read_text())["rows"]}
    assert (tmp_path / "train_step_smoke.md").read_text().startswith("# Training step time")
    assert list(rows) == ["dcft", "peft-lora", "dcft-dense"]
    for row in rows.values():
        assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0 and row["vs_lora"] > 0, row
    assert rows["peft-lora"]["vs_lora"] == 1.0
    assert rows["dcft"]["trainable_params"] == rows["dcft-dense"]["trainable_params"] > 0
