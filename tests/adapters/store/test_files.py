"""Adapter files: save/load round trip, and bad files that must fail cleanly.

Every bad case raises one AdapterError and leaves the target model untouched.
"""

import copy
import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from adapters.config import DCFTConfig
from adapters.errors import AdapterError, AdapterFileError, BaseModelMismatchError
from adapters.injection import dcft_layers, default_head_modules, inject_adapter
from adapters.store.files import CONFIG_NAME, WEIGHTS_NAME, adapter_digest, read_adapter_tensors
from adapters.store.loading import adapter_config_for, load_adapter, save_adapter
from benchmarks.fixtures import tiny_bert, tiny_llama

CONFIG = DCFTConfig(kernel_size=4, init="paper")


@pytest.fixture
def saved(tmp_path, device):
    """A trained-looking tiny BERT adapter on disk, and the model that made it."""
    torch.manual_seed(0)
    model = tiny_bert().to(device)
    heads = default_head_modules(model, "seq_cls")
    inject_adapter(model, CONFIG, heads)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    config = adapter_config_for(model, CONFIG, "tiny-bert", "seq_cls", heads, labels=["a", "b", "c"])
    return save_adapter(model, tmp_path / "adapter", config), model


def fresh_model():
    torch.manual_seed(0)
    return tiny_bert()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_round_trip_gives_identical_outputs(saved, device):
    path, trained = saved
    model = fresh_model().to(device)
    config = load_adapter(model, path)
    ids = torch.randint(0, 99, (2, 9), device=device)
    # the same weights and inputs in two model instances: equal up to the device's kernel choice
    torch.testing.assert_close(logits(model, ids), logits(trained, ids), rtol=1e-6, atol=1e-6)
    assert config.labels == ["a", "b", "c"] and config.head_modules == ["classifier"]
    assert len(adapter_digest(path)) == 64


def test_adapter_is_tiny(saved):
    path, _ = saved
    assert (path / WEIGHTS_NAME).stat().st_size < 8_000


def assert_rejected(path, match, exc=AdapterFileError):
    model = fresh_model()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(exc, match=match):
        load_adapter(model, path)
    assert not dcft_layers(model), "model must not be wrapped after a failed load"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def rewrite_tensors(path, edit):
    tensors = read_adapter_tensors(path)
    edit(tensors)
    save_file(tensors, str(path / WEIGHTS_NAME))


def test_truncated_weights(saved):
    path, _ = saved
    blob = (path / WEIGHTS_NAME).read_bytes()
    for cut in (0, 5, 40, len(blob) // 2, len(blob) - 1):
        (path / WEIGHTS_NAME).write_bytes(blob[:cut])
        assert_rejected(path, "truncated|header|bytes|cover")


def test_wrong_shape(saved):
    path, _ = saved
    name = next(n for n in read_adapter_tensors(path) if n.endswith("dcft_A"))
    rewrite_tensors(path, lambda t: t.__setitem__(name, torch.zeros(1, 3)))
    assert_rejected(path, r"shape \(1, 3\), expected")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values(saved, bad):
    path, _ = saved
    name = next(n for n in read_adapter_tensors(path) if n.endswith("dcft_C"))
    rewrite_tensors(path, lambda t: t[name].view(-1).__setitem__(0, bad))
    assert_rejected(path, "NaN or Inf")


def test_extra_and_missing_tensors(saved):
    path, _ = saved
    rewrite_tensors(path, lambda t: t.__setitem__("evil.payload", torch.zeros(2)))
    assert_rejected(path, "unexpected tensors")
    rewrite_tensors(path, lambda t: [t.pop("evil.payload"), t.pop(next(iter(t)))])
    assert_rejected(path, "missing tensors")


def test_wrong_dtype(saved):
    path, _ = saved
    rewrite_tensors(path, lambda t: t.__setitem__(next(iter(t)), torch.zeros(1, dtype=torch.int64)))
    assert_rejected(path, "dtype I64")


def test_wrong_base_model(saved):
    path, _ = saved
    model = tiny_llama()
    with pytest.raises(BaseModelMismatchError, match="tiny-bert"):
        load_adapter(model, path)
    assert not dcft_layers(model)


def test_absurd_declared_size_is_refused_without_allocating(saved):
    """A header declaring a 100 GB tensor is rejected from the header alone."""
    path, _ = saved
    header = json.dumps({"x": {"dtype": "F32", "shape": [25_000_000_000], "data_offsets": [0, 100_000_000_000]}})
    (path / WEIGHTS_NAME).write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 16)
    assert_rejected(path, "needs|cover")
    (path / WEIGHTS_NAME).write_bytes(struct.pack("<Q", 10**12) + b"{}")
    assert_rejected(path, "header declares")


def test_oversized_file_is_refused(saved, monkeypatch):
    path, _ = saved
    monkeypatch.setattr("adapters.store.files.MAX_WEIGHTS_BYTES", 100)
    assert_rejected(path, "exceeds the limit")


def test_pickle_payload_is_never_loaded(saved):
    path, _ = saved
    import pickle

    (path / WEIGHTS_NAME).write_bytes(pickle.dumps({"a": torch.zeros(2)}))
    assert_rejected(path, "header|truncated")


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.update(kernel_size="eight"), "kernel_size"),
        (lambda c: c.update(format_version=99), "format_version"),
        (lambda c: c.update(surprise=1), "surprise"),
        (lambda c: c.pop("target_layers"), "target_layers"),
        (lambda c: c.update(target_layers=["no.such.layer"]), "no.such.layer"),
        (lambda c: c.update(head_modules=["nohead"]), "nohead"),
    ],
)
def test_bad_config(saved, edit, match):
    path, _ = saved
    config = json.loads((path / CONFIG_NAME).read_text())
    edit(config)
    (path / CONFIG_NAME).write_text(json.dumps(config))
    assert_rejected(path, match, AdapterError)


def test_config_not_json(saved):
    path, _ = saved
    (path / CONFIG_NAME).write_bytes(b"\x80\x04not json")
    assert_rejected(path, CONFIG_NAME)


def test_missing_files(saved):
    path, _ = saved
    (path / WEIGHTS_NAME).unlink()
    assert_rejected(path, "missing")
