"""The layer benchmark end to end, tiny: every layer shape runs and the mixed path is timed."""

import json

from benchmarks import layer as layer_bench


def test_layer_benchmark_smoke(tmp_path):
    layer_bench.main(["--smoke", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "layer_smoke.json").read_text())["rows"]
    assert len(rows) == len(layer_bench.LAYER_SHAPES) and all(r["mixed_x"] > 0 for r in rows)
