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


def test_timed_rounds_runs_every_variant_once_a_round_in_changing_orders():
    """No variant always runs right after the same one: each round is a new (seeded) order, and each
    variant's times stay its own."""
    import torch

    from benchmarks.harness import Variant, timed_rounds

    log: list[str] = []
    variants = [Variant(name, 0, lambda name=name: log.append(name)) for name in "abcd"]
    samples = timed_rounds(variants, rounds=8, device=torch.device("cpu"))
    rounds = [log[i : i + 4] for i in range(4, len(log), 4)]  # after the warm-up's a, b, c, d
    assert log[:4] == list("abcd") and len(rounds) == 8
    assert all(sorted(order) == list("abcd") for order in rounds)
    assert len({tuple(order) for order in rounds}) > 1
    assert [len(times) for times in samples] == [8] * 4 and all(t >= 0 for times in samples for t in times)
