"""The chunked-prefill benchmark end to end, tiny: a random Llama, whole vs 16-token chunks."""

import json

import pytest

from benchmarks.prefill import main

pytestmark = pytest.mark.timeout(120)


def test_prefill_benchmark_smoke(tmp_path):
    main(["--smoke", "--out", str(tmp_path)])

    rows = json.loads((tmp_path / "prefill_smoke.json").read_text())["rows"]
    assert (tmp_path / "prefill_smoke.md").read_text().startswith("# Chunked prefill")
    assert [r["prefill_chunk_tokens"] for r in rows] == ["whole", 16]
    for row in rows:
        assert row["long_ttft_ms"] > 0 and row["worst_itl_while_joining_ms"] >= row["itl_before_ms"] > 0, row
    # 64 prompt tokens in 16-token chunks: the running rows decode between the chunks
    assert rows[1]["decode_steps_while_joining"] >= 3 > rows[0]["decode_steps_while_joining"]
