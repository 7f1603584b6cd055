"""Training: a few steps lower the loss and write a loadable adapter; the regulariser is right."""

import argparse
import csv
import json

import pytest
import torch
from transformers import TrainerCallback, set_seed

from adapters.config import DCFTConfig
from adapters.injection import default_head_modules, inject_adapter
from adapters.store.files import read_adapter_config
from adapters.store.loading import load_adapter
from backbones.loading import load_backbone, load_tokenizer
from benchmarks.fixtures import tiny_bert, tiny_bert_dir, tiny_llama_dir
from cli.train import TRAIN_FLAGS, train_config_from
from training import train
from training.config import OptimConfig, TrainConfig
from training.data import DataConfig, load_dataset
from training.evaluate import evaluate_adapter
from training.train import fit, train_adapter
from training.trainer import orthogonal_regulariser

WORDS = {"pos": ["great", "superb", "wonderful", "moving"], "neg": ["awful", "dull", "boring", "bad"]}


@pytest.fixture(scope="module")
def sentiment_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    gen = torch.Generator().manual_seed(0)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for i in range(160):
            label = "pos" if i % 2 else "neg"
            word = WORDS[label][int(torch.randint(0, 4, (1,), generator=gen))]
            writer.writerow([f"the film number {i} was {word} overall", label])
    return path


def test_training_lowers_loss_and_writes_loadable_adapter(tmp_path, sentiment_csv):
    bert = tiny_bert_dir(tmp_path / "bert")
    config = TrainConfig(
        model=str(bert), output_dir=tmp_path / "adapter",
        data=DataConfig(source=str(sentiment_csv), text_columns=["review"], label_column="sentiment"),
        dcft=DCFTConfig(kernel_size=4),
        optim=OptimConfig(epochs=4, batch_size=16, learning_rate=2e-2, gamma=0.1, logging_steps=4),
    )
    adapter, result = train_adapter(config)
    losses = [entry["loss"] for entry in result.history if "loss" in entry]
    assert len(losses) >= 4 and sum(losses[-2:]) < sum(losses[:2]), losses
    assert all("orth_penalty" in entry for entry in result.history if "loss" in entry)
    saved = read_adapter_config(tmp_path / "adapter")
    assert (
        saved.labels == ["neg", "pos"] and saved.metadata["metrics"]["test_accuracy"] == result.metrics["test_accuracy"]
    )
    again = evaluate_adapter(tmp_path / "adapter", config.data, "test", model=str(bert))
    assert again["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])


def test_training_on_the_whole_file_without_evaluation(tmp_path, sentiment_csv):
    """No validation or test split carved out (what a fine-tuning job without a validation file trains on)."""
    config = TrainConfig(
        model=str(tiny_bert_dir(tmp_path / "bert")), output_dir=tmp_path / "adapter",
        data=DataConfig(source=str(sentiment_csv), text_columns=["review"], label_column="sentiment",
                        validation_fraction=0, test_fraction=0),
        dcft=DCFTConfig(kernel_size=4), optim=OptimConfig(epochs=1, batch_size=32, eval_every_epoch=False),
    )
    _, result = train_adapter(config)
    assert result.metrics == {} and max(entry.get("step", 0) for entry in result.history) == 5  # 160 rows
    assert read_adapter_config(tmp_path / "adapter").labels == ["neg", "pos"]


class Stopped(Exception):
    """Stands in for the process being killed right after an epoch's checkpoint."""


class StopAfterFirstEpoch(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.epoch >= 1:
            raise Stopped


def test_a_run_stopped_after_an_epoch_resumes_to_the_same_weights(tmp_path, sentiment_csv, monkeypatch):
    bert = tiny_bert_dir(tmp_path / "bert")
    splits = load_dataset(DataConfig(source=str(sentiment_csv), text_columns=["review"], label_column="sentiment"))
    optim = OptimConfig(epochs=3, batch_size=16, learning_rate=2e-2, group_by_length=True, early_stopping_patience=2)

    def trained(work):
        set_seed(0)
        model = load_backbone(bert, "seq_cls", 2)
        inject_adapter(model, DCFTConfig(kernel_size=4), default_head_modules(model, "seq_cls"))
        result = fit(model, load_tokenizer(bert), splits, "seq_cls", optim, work, model.device, 0.1, ("validation",),
                     resumable=True)
        return result, {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}

    whole, whole_weights = trained(tmp_path / "whole")

    def dying_after_first_epoch(optim, early_stopping=train.early_stopping):
        return [*early_stopping(optim), StopAfterFirstEpoch()]

    with monkeypatch.context() as patched:  # the first attempt dies after its first epoch's checkpoint
        patched.setattr(train, "early_stopping", dying_after_first_epoch)
        with pytest.raises(Stopped):
            trained(tmp_path / "stopped")
    resumed, resumed_weights = trained(tmp_path / "stopped")
    assert whole.resumed_at_epoch is None and resumed.resumed_at_epoch == 1.0
    assert resumed.metrics["validation_accuracy"] == whole.metrics["validation_accuracy"]
    for name, weight in whole_weights.items():  # the optimizer, schedule and RNG states came back too
        torch.testing.assert_close(resumed_weights[name], weight, rtol=0, atol=1e-6)
    assert [e["epoch"] for e in resumed.history if "eval_accuracy" in e] == [1.0, 2.0, 3.0]


def test_causal_lm_training_writes_adapter_and_reports_perplexity(tmp_path, sentiment_csv):
    llama = tiny_llama_dir(tmp_path / "llama")
    config = TrainConfig(
        model=str(llama), output_dir=tmp_path / "lm",
        data=DataConfig(source=str(sentiment_csv), task_type="causal_lm", text_columns=["review"], label_column=None),
        dcft=DCFTConfig(kernel_size=4), optim=OptimConfig(max_steps=5, batch_size=8, learning_rate=1e-2),
    )
    _, result = train_adapter(config)
    assert result.metrics["test_perplexity"] > 1
    model = load_backbone(llama, "causal_lm")
    load_adapter(model, tmp_path / "lm")


def test_regulariser_value_and_gradient():
    model = tiny_bert()
    inject_adapter(model, DCFTConfig(kernel_size=4, init="paper"))
    layers = [m for m in model.modules() if hasattr(m, "dcft_A") and m.dcft_A is not None]
    with torch.no_grad():
        for layer in layers:
            layer.dcft_A.fill_(0.5)  # |a|^2 = n / 4
            layer.dcft_B.zero_()  # |b|^2 = 0 -> penalty 1
    expected = sum(abs(layer.dcft_A.numel() / 4 - 1) + 1 for layer in layers) / len(layers)
    penalty = orthogonal_regulariser(model)
    assert penalty.item() == pytest.approx(expected)
    penalty.backward()
    layer = layers[0]
    sign = 1.0 if layer.dcft_A.numel() / 4 > 1 else -1.0
    torch.testing.assert_close(layer.dcft_A.grad, sign * 2 * layer.dcft_A.detach() / len(layers))


def test_missing_column_is_a_clear_error(tmp_path, sentiment_csv):
    from adapters.errors import DataError
    from training.data import load_dataset

    with pytest.raises(DataError, match="text"):
        load_dataset(DataConfig(source=str(sentiment_csv), text_columns=["text"], label_column="sentiment"))


def test_train_cli_flags_override_config_file(tmp_path):
    config_file = tmp_path / "train.json"
    config_file.write_text(json.dumps({"dcft": {"kernel_size": 4}, "optim": {"epochs": 1}}))
    args = argparse.Namespace(config=str(config_file), **dict.fromkeys(TRAIN_FLAGS))
    args.kernel_size, args.lr = 12, 0.01
    config = train_config_from(args)
    assert config.dcft.kernel_size == 12 and config.optim.learning_rate == 0.01 and config.optim.epochs == 1
