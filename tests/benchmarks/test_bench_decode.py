"""The decode benchmark end to end, tiny: every variant and shape in the report with positive
numbers, and the dispatch table holding a wrapped layer to at most two ops."""

import json

import pytest

from benchmarks.decode import ADAPTERS, main

pytestmark = pytest.mark.timeout(180)


def test_decode_benchmark_smoke(tmp_path):
    main(["--smoke", "--out", str(tmp_path)])

    report = (tmp_path / "decode.md").read_text()
    assert report.startswith("# Decode step") and "## Dispatched ops" in report
    rows = json.loads((tmp_path / "decode.json").read_text())["rows"]
    systems = ["bare", "dcft-0", f"dcft-{ADAPTERS}", "bare-hf"]
    assert [(r["rows"], r["system"]) for r in rows] == [(n, s) for n in (1, 4) for s in systems]
    for row in rows:
        assert row["ms_per_step"] > 0 and row["tokens_per_s"] > 0 and row["vs_bare"] > 0, row
    assert "| decode step, 8 rows | dcft-64 |" in report
    per_layer = [line.split("|")[5] for line in report.splitlines() if line.startswith("| decode step")
                 or line.startswith("| classify")]
    assert per_layer and all(float(cell) <= 2 for cell in per_layer)


def test_paired_speed_pairs_each_round_with_its_own_reference():
    """A drift that slows both variants of a round alike leaves their paired speed unchanged, where
    a ratio of two medians would not be."""
    from benchmarks.harness import paired_speed

    bare = [1.0, 2.0, 3.0, 4.0, 5.0]  # the machine slows down round by round
    wrapped = [t * 1.25 for t in bare]  # always 25% slower within its round
    (ref, ref_low, ref_high), (speed, low, high) = paired_speed([bare, wrapped])
    assert (ref, ref_low, ref_high) == (1.0, 1.0, 1.0)
    assert speed == pytest.approx(0.8, rel=1e-12) and low == pytest.approx(0.8) and high == pytest.approx(0.8)
    (_, (one_round, _, _)) = paired_speed([[2.0], [4.0]])
    assert one_round == 0.5
