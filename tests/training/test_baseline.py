"""What the demo prints beside each trained adapter: its baseline on the same test split."""

from __future__ import annotations

import csv

import pytest

from backbones.loading import load_backbone, load_tokenizer
from benchmarks.fixtures import tiny_bert_dir, tiny_llama_dir
from training.config import OptimConfig, TrainConfig
from training.data import DataConfig, load_dataset
from training.evaluate import baseline_metrics, evaluate_model, versus_baseline

WORDS = {"pos": "great superb wonderful", "neg": "awful dull boring"}


@pytest.fixture(scope="module")
def reviews_csv(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(60):
            label = "pos" if i % 2 else "neg"
            writer.writerow([f"film {i} was {WORDS[label].split()[i % 3]}", label])
    return path


def test_classifier_baseline_trains_the_head_alone(tmp_path, reviews_csv):
    config = TrainConfig(model=str(tiny_bert_dir(tmp_path / "bert")), data=DataConfig(source=str(reviews_csv)),
                         optim=OptimConfig(epochs=1, batch_size=16))
    baseline = baseline_metrics(config)
    assert 0 <= baseline["test_accuracy"] <= 1 and "validation_accuracy" not in baseline
    line = versus_baseline(config, {"test_accuracy": 0.9})
    assert line.startswith("accuracy on test 0.900 with the adapter vs ") and line.endswith(" head only")


def test_lm_baseline_is_the_bare_backbone_on_the_same_split(tmp_path, reviews_csv):
    llama = tiny_llama_dir(tmp_path / "llama")
    data = DataConfig(source=str(reviews_csv), task_type="causal_lm")
    config = TrainConfig(model=str(llama), data=data, optim=OptimConfig(eval_batch_size=8))
    bare = evaluate_model(load_backbone(llama, "causal_lm"), load_tokenizer(llama), load_dataset(data).test,
                          "causal_lm", config.optim, load_backbone(llama, "causal_lm").device)
    assert baseline_metrics(config)["test_perplexity"] == pytest.approx(bare["test_perplexity"], rel=1e-6)
    assert "vs " in versus_baseline(config, {"test_perplexity": 10.0})
