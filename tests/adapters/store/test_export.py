"""`dcft export --format peft-lora`: PEFT loads the exported folder and computes our function.

Tolerances: the LoRA factors are exact products of the DCFT tensors (one rounding each), so
PEFT's outputs differ from ours only by the order of fp32 sums: rtol 1e-4, atol 1e-5 on logits.
SmolLM2 sums over 30 layers and logits up to ~27: atol 5e-4 there (our own merged and factored
forms differ by 1.5e-4 on the same logits, PEFT's from ours by 1.9e-4; the adapter moves them by ~28).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.config import DCFTConfig
from adapters.functional import delta_weight, lora_factors
from adapters.injection import dcft_layers, default_head_modules, inject_adapter, remove_adapter
from adapters.store.export import export_peft_lora
from adapters.store.loading import adapter_config_for, load_adapter, save_adapter
from backbones.loading import backbone_ref, load_backbone, load_tokenizer
from backbones.shipped import resolve_model_dir
from benchmarks.fixtures import tiny_bert_dir, tiny_llama_dir
from cli.main import main as dcft_main

peft = pytest.importorskip("peft")

RTOL, ATOL = 1e-4, 1e-5
DEEP_ATOL = {"smollm2": 5e-4}
TEXTS = ["a gripping and funny film with a great cast", "dull, overlong and badly written"]


@pytest.mark.parametrize("rank", [1, 2])
@pytest.mark.parametrize(("kernel", "stride"), [(4, 4), (4, 2), (8, 8), (8, 3)])
def test_lora_factors_rebuild_delta_weight(kernel, stride, rank):
    torch.manual_seed(0)
    out_f, in_f = kernel + 5 * stride, kernel + 7 * stride
    m, n = (out_f - kernel) // stride + 1, (in_f - kernel) // stride + 1
    A, B, C = torch.randn(rank, n), torch.randn(m, rank), torch.randn(kernel, kernel)
    down, up = lora_factors(A, B, C, stride)
    assert down.shape == (rank * kernel, in_f) and up.shape == (out_f, rank * kernel)
    torch.testing.assert_close(0.5 * up @ down, delta_weight(A, B, C, stride, 0.5), rtol=1e-5, atol=1e-5)


def make_adapter(model_dir: Path, out: Path, task: str, config: DCFTConfig, seed: int = 0) -> Path:
    """An adapter with random (non-zero) DCFT tensors and head, so every part shows in the outputs."""
    torch.manual_seed(seed)
    labels = ["neg", "pos"] if task == "seq_cls" else []
    model = load_backbone(model_dir, task, len(labels) or None)
    heads = default_head_modules(model, task)
    inject_adapter(model, config, heads)
    with torch.no_grad():
        for layer in dcft_layers(model).values():
            for param in (layer.dcft_A, layer.dcft_B, layer.dcft_C):
                param.copy_(torch.randn_like(param) * 0.3)
        for param in (p for head in heads for p in model.get_submodule(head).parameters()):
            param.copy_(torch.randn_like(param))
    name = backbone_ref(model_dir, model.config).name
    return save_adapter(model, out, adapter_config_for(model, config, name, task, heads, labels))


def outputs_match(model_dir: Path, adapter_dir: Path, lora_dir: Path, task: str, atol: float = ATOL) -> None:
    """Logits of our loaded adapter vs PEFT's PeftModel.from_pretrained on the exported folder."""
    labels = 2 if task == "seq_cls" else None
    ours = load_backbone(model_dir, task, labels)
    load_adapter(ours, adapter_dir)
    theirs = peft.PeftModel.from_pretrained(load_backbone(model_dir, task, labels), str(lora_dir)).eval()
    batch = load_tokenizer(model_dir)(TEXTS, padding=True, return_tensors="pt")
    batch = {k: v.to(ours.device) for k, v in batch.items()}  # both models are on load_backbone's device
    with torch.no_grad():
        expected, found = ours(**batch).logits, theirs(**batch).logits
        remove_adapter(ours)  # same head, no DCFT layers: the layers must move the outputs
        assert (ours(**batch).logits - expected).abs().max() > 100 * atol
    torch.testing.assert_close(found, expected, rtol=RTOL, atol=atol)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {"seq_cls": tiny_bert_dir(root / "bert"), "causal_lm": tiny_llama_dir(root / "llama")}


@pytest.mark.parametrize(("kernel", "stride", "rank"), [(8, None, 1), (8, 4, 1), (4, 2, 2)])
@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_peft_loads_export_and_matches(tiny_dirs, tmp_path, task, kernel, stride, rank):
    model_dir = tiny_dirs[task]
    config = DCFTConfig(kernel_size=kernel, stride=stride, rank=rank, alpha=2.0, init="paper")
    adapter = make_adapter(model_dir, tmp_path / "dcft", task, config)
    summary = export_peft_lora(adapter, tmp_path / "lora", model_dir)
    saved = json.loads((tmp_path / "lora/adapter_config.json").read_text())
    assert saved["r"] == rank * kernel == summary.rank
    assert saved["lora_alpha"] / saved["r"] == config.scale
    assert saved["modules_to_save"] == (["classifier"] if task == "seq_cls" else None)
    outputs_match(model_dir, adapter, tmp_path / "lora", task)


def test_cli_export_writes_peft_folder(tiny_dirs, tmp_path, capsys):
    adapter = make_adapter(tiny_dirs["seq_cls"], tmp_path / "dcft", "seq_cls", DCFTConfig(kernel_size=8))
    dcft_main(["export", "--format", "peft-lora", str(adapter), "--out", str(tmp_path / "lora"),
               "--model", str(tiny_dirs["seq_cls"])])
    assert "rank 8" in capsys.readouterr().out
    keys = load_file(tmp_path / "lora/adapter_model.safetensors")
    assert "base_model.model.classifier.weight" in keys
    assert sum(key.endswith("lora_A.weight") for key in keys) == 12  # 2 layers x 6 targets


def test_export_refuses_its_own_folder(tiny_dirs, tmp_path):
    adapter = make_adapter(tiny_dirs["seq_cls"], tmp_path / "dcft", "seq_cls", DCFTConfig(kernel_size=8))
    with pytest.raises(ValueError, match="own folder"):
        export_peft_lora(adapter, adapter, tiny_dirs["seq_cls"])


@pytest.mark.real
@pytest.mark.parametrize(
    ("backbone", "task"), [("minilm", "seq_cls"), pytest.param("smollm2", "causal_lm", marks=pytest.mark.slow)]
)
def test_real_backbone_export_matches_peft(backbone, task, tmp_path):
    model_dir = resolve_model_dir(backbone)
    adapter = make_adapter(model_dir, tmp_path / "dcft", task, DCFTConfig(kernel_size=8, init="paper"))
    summary = export_peft_lora(adapter, tmp_path / "lora", model_dir, base_model=backbone)
    assert summary.lora_bytes > summary.dcft_bytes
    outputs_match(model_dir, adapter, tmp_path / "lora", task, DEEP_ATOL.get(backbone, ATOL))
