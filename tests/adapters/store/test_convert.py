"""The converter from the authors' loralib checkpoints gives the authors' outputs."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from adapters.config import BaseModelRef
from adapters.errors import AdapterFileError
from adapters.store.convert import convert_loralib_checkpoint
from adapters.store.loading import layer_dims, load_adapter
from benchmarks.fixtures import tiny_bert

KERNEL, SCALING = 4, 0.5


class AuthorsSVDLinear(torch.nn.Module):
    """The authors' released forward: x @ conv_transpose2d(A.T @ B.T, C), stride = kernel."""

    def __init__(self, base: torch.nn.Linear, gen: torch.Generator):
        super().__init__()
        self.base = base
        out_f, in_f = base.weight.shape
        # buffers, so the layer moves with the model to the test device
        self.register_buffer("lora_A", torch.randn(1, in_f // KERNEL, generator=gen))
        self.register_buffer("lora_B", torch.randn(out_f // KERNEL, 1, generator=gen))
        self.register_buffer("lora_C", torch.randn(1, 1, KERNEL, KERNEL, generator=gen))

    def forward(self, x):
        update = F.conv_transpose2d((self.lora_A.T @ self.lora_B.T)[None, None], self.lora_C, stride=KERNEL)[0, 0]
        return self.base(x) + SCALING * (x @ update)


def authors_model():
    """A tiny BERT with every attention query/value replaced by the authors' layer."""
    torch.manual_seed(0)
    model = tiny_bert()
    gen = torch.Generator().manual_seed(7)
    state = {}
    for name in [n for n in layer_dims(model) if n.endswith(("query", "value"))]:
        parent, _, child = name.rpartition(".")
        layer = AuthorsSVDLinear(model.bert.get_submodule(name), gen)
        setattr(model.bert.get_submodule(parent), child, layer)
        state |= {f"roberta.{name}.{p}": getattr(layer, p) for p in ("lora_A", "lora_B", "lora_C")}
    return model, state


def test_converted_adapter_reproduces_authors_outputs(tmp_path, device):
    theirs, state = authors_model()
    theirs.to(device)
    checkpoint = tmp_path / "dcft_roberta.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(checkpoint))
    torch.manual_seed(0)
    ours = tiny_bert()
    ref = BaseModelRef.from_model_config("tiny-bert", ours.config)
    config = convert_loralib_checkpoint(checkpoint, tmp_path / "adapter", ref, list(layer_dims(ours)), SCALING)
    assert len(config.target_layers) == 4 and config.kernel_size == KERNEL
    load_adapter(ours.to(device), tmp_path / "adapter")
    ids = torch.randint(0, 99, (2, 6), device=device)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-6)


def test_pickle_checkpoints_are_refused(tmp_path):
    (tmp_path / "model.bin").write_bytes(b"\x80\x04")
    ref = BaseModelRef(name="x", config_digest="0" * 32)
    with pytest.raises(AdapterFileError, match="no pickle"):
        convert_loralib_checkpoint(tmp_path / "model.bin", tmp_path / "out", ref, ["a"])


def test_incomplete_layer_is_refused(tmp_path):
    _, state = authors_model()
    state.pop(next(k for k in state if k.endswith("lora_C")))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "c.safetensors"))
    ref = BaseModelRef(name="x", config_digest="0" * 32)
    with pytest.raises(AdapterFileError, match="needs all of"):
        convert_loralib_checkpoint(tmp_path / "c.safetensors", tmp_path / "out", ref, list(layer_dims(tiny_bert())))
