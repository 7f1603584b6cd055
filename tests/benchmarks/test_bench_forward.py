"""The whole-model throughput benchmark end to end, tiny: random BERT and Llama, every system and
distinct count present in the report with positive numbers, and the over-batch count capped."""

import json

import pytest
import torch

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


def test_static_cache_decode_steps_match_the_dynamic_cache(device):
    """What --cuda-graphs replays for decode: fed steps on a static cache give the usual logits."""
    from transformers import DynamicCache

    from benchmarks.fixtures import tiny_llama
    from benchmarks.graph_replay import StaticDecode

    torch.manual_seed(0)
    model = tiny_llama().to(device)
    prompt, next_ids = torch.randint(0, 99, (3, 7), device=device), torch.randint(0, 99, (3, 4), device=device)
    with torch.no_grad():
        cache = DynamicCache()
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        want = [model(input_ids=next_ids[:, s : s + 1], past_key_values=cache, use_cache=True).logits
                for s in range(4)]
        decode = StaticDecode(model, prompt, 4, {})
        for step, expected in enumerate(want):
            decode.feed(next_ids[:, step : step + 1], step)
            torch.testing.assert_close(decode.step(), expected, rtol=1e-4, atol=1e-5)
