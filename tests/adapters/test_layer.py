"""Layers and injection on real architectures: every path gives the same outputs.

Parametrised over tiny random BERT, GPT-2 (Conv1D, weights stored transposed) and
Llama models, and the real MiniLM backbone.
"""

import copy

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from adapters import functional as dcft
from adapters.config import DCFTConfig
from adapters.errors import TargetError
from adapters.injection import (
    attach_banks,
    backbone_prefix,
    dcft_layers,
    default_head_modules,
    inject_adapter,
    merge_adapter,
    remove_adapter,
    trainable_parameters,
    unmerge_adapter,
    wrap_layers,
)
from adapters.layer import LayerBank, SlotBatch
from benchmarks.fixtures import TINY_MODELS

CONFIG = DCFTConfig(kernel_size=4, init="paper", alpha=4.0)
# fp32 through a whole network with large random adapters: merged (W + dW) and factored
# round differently at every layer. One layer agrees to ~1e-6 (test_functional.py).
REL_TOL = 3e-5


def outputs(model, input_ids):
    """The last hidden state: O(1) values, so a relative error measures the paths, not a tiny head."""
    with torch.no_grad():
        return model(input_ids=input_ids, output_hidden_states=True).hidden_states[-1]


def random_ids(model, rows=3, length=7, seed=0):
    """Token ids on the model's device, the same on every device."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (rows, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(model.device)


def randomise_adapter(model, seed):
    """Large random A, B, C so every layer's update visibly changes the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in dcft_layers(model).values():
            for param in (layer.dcft_A, layer.dcft_B, layer.dcft_C):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def reference_with_dense_delta(base_model, adapted):
    """The base model with W + dW written in by the paper's conv_transpose2d, by hand."""
    reference = copy.deepcopy(base_model)
    for name, layer in dcft_layers(adapted).items():
        dW = dcft.delta_weight(layer.dcft_A, layer.dcft_B, layer.dcft_C, layer.stride, layer.scale)
        target = reference.get_submodule(backbone_prefix(reference) + name)
        with torch.no_grad():
            target.weight += dW.T if layer.weight_transposed else dW
    return reference


@pytest.fixture(params=[*sorted(TINY_MODELS), pytest.param("minilm", marks=pytest.mark.real)])
def any_model(request, device):
    """Every tiny architecture, and the real MiniLM backbone, on the test device."""
    torch.manual_seed(0)
    if request.param in TINY_MODELS:
        return TINY_MODELS[request.param]().to(device)
    minilm_dir = request.getfixturevalue("minilm_dir")
    return AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=2).eval().to(device)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_factored_matches_dense_reference_and_merged(any_model):
    base = copy.deepcopy(any_model)
    ids = random_ids(any_model)
    inject_adapter(any_model, CONFIG)
    randomise_adapter(any_model, seed=1)
    factored = outputs(any_model, ids)
    reference = outputs(reference_with_dense_delta(base, any_model), ids)
    assert rel_err(factored, outputs(base, ids)) > 1e-3, "adapter must change the outputs"
    assert rel_err(factored, reference) < REL_TOL
    merge_adapter(any_model)
    assert rel_err(outputs(any_model, ids), reference) < REL_TOL


def test_merge_then_unmerge_restores_weights_exactly(any_model):
    before = {k: v.clone() for k, v in any_model.state_dict().items()}
    inject_adapter(any_model, CONFIG)
    randomise_adapter(any_model, seed=2)
    merge_adapter(any_model)
    unmerge_adapter(any_model)
    remove_adapter(any_model)
    after = any_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_only_adapter_and_head_train(tiny_model):
    heads = default_head_modules(tiny_model, "seq_cls")
    inject_adapter(tiny_model, CONFIG, heads)
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    assert trainable and all(".dcft_" in n or any(n.startswith(h + ".") for h in heads) for n in trainable)
    counts = trainable_parameters(tiny_model)
    layers = dcft_layers(tiny_model).values()
    assert counts["dcft"] == sum(l.in_features // 4 + l.out_features // 4 + 16 for l in layers)


def test_training_uses_factored_path_and_grads_reach_only_adapter(tiny_model, monkeypatch):
    inject_adapter(tiny_model, CONFIG)
    randomise_adapter(tiny_model, seed=3)
    monkeypatch.setattr(dcft, "delta_weight", lambda *a, **k: pytest.fail("dense dW built in training"))
    tiny_model.train()
    tiny_model(input_ids=random_ids(tiny_model)).logits.square().mean().backward()
    for name, param in tiny_model.named_parameters():
        assert (param.grad is not None) == (".dcft_" in name), name
        if param.grad is not None:
            assert param.grad.abs().sum() > 0, name


def test_zero_delta_init_keeps_pretrained_function(any_model):
    ids = random_ids(any_model)
    before = outputs(any_model, ids)
    inject_adapter(any_model, CONFIG.model_copy(update={"init": "zero_delta"}))
    torch.testing.assert_close(outputs(any_model, ids), before, rtol=1e-5, atol=1e-6)


def test_mixed_batch_rows_match_each_adapter_alone(any_model):
    base = copy.deepcopy(any_model)
    rows_slots = torch.tensor([1, 0, 3, 2, 1], device=any_model.device)  # slot 0 = bare backbone
    ids = random_ids(any_model, rows=len(rows_slots), seed=4)
    singles = []
    for seed in (11, 12, 13):
        single = copy.deepcopy(base)
        inject_adapter(single, CONFIG)
        randomise_adapter(single, seed)
        singles.append(single)
    mixed = copy.deepcopy(base)
    names = wrap_layers(mixed, CONFIG, own_adapter=False)
    batch, banks = SlotBatch(), {}
    for name in names:
        layer = dcft_layers(singles[0])[name]
        grid = dcft.grid_shape(layer.out_features, layer.in_features, 4, 4)
        banks[name] = LayerBank.empty(4, grid, kernel_size=4, rank=1, batch=batch, device=any_model.device)
        for slot, single in enumerate(singles, start=1):
            src = dcft_layers(single)[name]
            banks[name].write_slot(slot, src.dcft_A, src.dcft_B, src.dcft_C, src.scale)
    attach_banks(mixed, banks)
    batch.slot_index = rows_slots
    got = outputs(mixed, ids)
    for single in singles:
        merge_adapter(single)
    for row, slot in enumerate(rows_slots.tolist()):
        alone = outputs(singles[slot - 1] if slot else base, ids[row : row + 1])[0]
        assert rel_err(got[row], alone) < REL_TOL, f"row {row} (slot {slot})"


def test_bf16_factored_close_to_fp32(tiny_model):
    ids = random_ids(tiny_model)
    inject_adapter(tiny_model, CONFIG)
    randomise_adapter(tiny_model, seed=5)
    reference = outputs(tiny_model, ids)
    low = outputs(tiny_model.to(torch.bfloat16), ids).float()
    assert rel_err(low, reference) < 5e-2  # bf16 through a whole (tiny) network


def test_kernel_that_does_not_divide_names_the_layer(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with pytest.raises(TargetError, match=r"layer '.*': kernel 5 does not divide"):
        inject_adapter(tiny_model, DCFTConfig(kernel_size=5))
    assert not dcft_layers(tiny_model), "a failed injection must leave the model unchanged"
    assert all(torch.equal(v, tiny_model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("targets", [["nonexistent_layer"], ["q", "bogus"], ["(unclosed"]])
def test_unknown_or_empty_targets_are_errors(tiny_model, targets):
    with pytest.raises(TargetError, match="target"):
        inject_adapter(tiny_model, DCFTConfig(kernel_size=4, targets=targets))


@pytest.mark.parametrize("preset,per_block", [("all", None), ("qv", 2), ("ffn", None)])
def test_presets_resolve_per_architecture(tiny_model, preset, per_block):
    names = wrap_layers(tiny_model, DCFTConfig(kernel_size=4, targets=[preset]))
    assert names
    if per_block:  # GPT-2 fuses q and v into c_attn: one layer per block
        expected = 1 if tiny_model.config.model_type == "gpt2" else per_block
        assert len(names) == expected * tiny_model.config.num_hidden_layers


def test_stride_smaller_than_kernel_trains_and_merges(tiny_model):
    config = DCFTConfig(kernel_size=4, stride=2, init="paper")
    base = copy.deepcopy(tiny_model)
    ids = random_ids(tiny_model)
    inject_adapter(tiny_model, config)
    randomise_adapter(tiny_model, seed=6)
    factored = outputs(tiny_model, ids)
    assert rel_err(factored, outputs(reference_with_dense_delta(base, tiny_model), ids)) < REL_TOL
    merge_adapter(tiny_model)
    assert rel_err(outputs(tiny_model, ids), factored) < REL_TOL
