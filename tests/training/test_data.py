"""Datasets: the built-in rotten-tomatoes split, and user CSV/JSONL files with clear errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

from adapters.errors import DataError
from training.data import (
    ROTTEN_TOMATOES_TEXT,
    DataConfig,
    DatasetSplits,
    TextExample,
    load_dataset,
    split_seeded,
)

PARTS = ("train", "validation", "test")


@pytest.fixture(scope="module")
def rotten() -> DatasetSplits:
    return load_dataset(DataConfig())


def write_csv(path: Path, header: str, *rows: str) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, *records: dict) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def reviews(n: int, label_of=lambda i: ("neg", "pos")[i % 2]) -> list[str]:
    return [f'"review number {i}, with a comma",{label_of(i)}' for i in range(n)]


# --- built-in: rotten tomatoes ---


@pytest.mark.real
def test_rotten_tomatoes_split_sizes_and_labels(rotten):
    assert (len(rotten.train), len(rotten.validation), len(rotten.test)) == (10_202, 1_275, 1_275)
    assert rotten.labels == ("rotten", "fresh") and rotten.num_labels == 2 and rotten.task_type == "seq_cls"
    counts = {part: Counter(example.label for example in getattr(rotten, part)) for part in PARTS}
    assert counts["train"] == {1: 5_894, 0: 4_308}
    assert counts["validation"] == counts["test"] == {1: 737, 0: 538}


@pytest.mark.real
def test_rotten_tomatoes_is_deterministic_and_splits_do_not_overlap(rotten):
    assert load_dataset(DataConfig(source="rotten-tomatoes")) == rotten
    texts = [{example.text for example in getattr(rotten, part)} for part in PARTS]
    assert sum(map(len, texts)) == 12_752  # no duplicate text inside a split either
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])


@pytest.mark.real
def test_rotten_tomatoes_labels_are_balanced_across_splits(rotten):
    fresh_share = [sum(e.label for e in getattr(rotten, part)) / len(getattr(rotten, part)) for part in PARTS]
    assert max(fresh_share) - min(fresh_share) < 0.005


@pytest.mark.real
def test_rotten_tomatoes_text_is_the_same_reviews_without_labels(rotten):
    text = load_dataset(DataConfig(source=ROTTEN_TOMATOES_TEXT))
    assert text.task_type == "causal_lm" and text.labels == () and text.num_labels is None
    for part in PARTS:
        assert [e.text for e in getattr(text, part)] == [e.text for e in getattr(rotten, part)]
        assert {e.label for e in getattr(text, part)} == {None}


@pytest.mark.real
def test_max_examples_caps_every_split_reproducibly(rotten):
    small = load_dataset(DataConfig(max_examples=50))
    assert [len(getattr(small, part)) for part in PARTS] == [50, 50, 50]
    assert set(small.test) <= set(rotten.test)
    assert load_dataset(DataConfig(max_examples=50)) == small


def test_built_in_split_cannot_be_reconfigured():
    with pytest.raises(ValidationError, match="fixed split"):
        DataConfig(source="rotten-tomatoes", seed=3)
    with pytest.raises(ValidationError, match="is causal_lm, not seq_cls"):
        DataConfig(source=ROTTEN_TOMATOES_TEXT, task_type="seq_cls")
    with pytest.raises(ValidationError, match="has labels"):
        DataConfig(labels=["fresh", "rotten"])


def test_a_full_dump_of_a_built_in_config_loads_back():
    spec = DataConfig(max_examples=10, labels=["rotten", "fresh"])
    assert DataConfig.model_validate(spec.model_dump(mode="json")) == spec


def test_config_checks_fractions_and_label_column():
    with pytest.raises(ValidationError, match="leave some rows"):
        DataConfig(source="x.csv", validation_fraction=0.5, test_fraction=0.5)
    with pytest.raises(ValidationError, match="needs a label_column"):
        DataConfig(source="x.csv", label_column=None)
    with pytest.raises(ValidationError):
        DataConfig(source="x.csv", text_columns=["a", "b", "c"])


# --- splitting ---


def test_split_is_seeded_and_stratified():
    items = [TextExample(str(i), None, int(i % 4 == 0)) for i in range(200)]
    first = split_seeded(items, 0.1, 0.2, seed=5, stratify_by=lambda e: e.label)
    assert first == split_seeded(items, 0.1, 0.2, seed=5, stratify_by=lambda e: e.label)
    assert first != split_seeded(items, 0.1, 0.2, seed=6, stratify_by=lambda e: e.label)
    train, validation, test = first
    assert (len(train), len(validation), len(test)) == (140, 20, 40)
    assert [sum(e.label for e in part) for part in first] == [35, 5, 10]
    assert sorted(train + validation + test, key=lambda e: int(e.text)) == items


def test_every_class_keeps_a_training_example():
    items = [TextExample("a", None, 0), TextExample("b", None, 0), TextExample("c", None, 1)]
    train, _, _ = split_seeded(items, 0.45, 0.45, seed=0, stratify_by=lambda e: e.label)
    assert {e.label for e in train} == {0, 1}


# --- user files ---


def test_csv_text_pairs_with_a_carved_validation_split(tmp_path):
    rows = [f"premise {i},hypothesis {i},{('yes', 'no', 'maybe')[i % 3]}" for i in range(30)]
    path = write_csv(tmp_path / "nli.csv", "premise,hypothesis,answer", *rows)
    spec = DataConfig(source=str(path), text_columns=["premise", "hypothesis"], label_column="answer", test_fraction=0)
    data = load_dataset(spec)
    assert data.labels == ("maybe", "no", "yes") and data.name == "nli"
    assert (len(data.train), len(data.validation), len(data.test)) == (27, 3, 0)
    assert Counter(e.label for e in data.validation) == {0: 1, 1: 1, 2: 1}
    example = data.train[0]
    index = int(example.text.split()[1])
    assert (
        example.text_pair == f"hypothesis {index}" and data.labels[example.label] == ("yes", "no", "maybe")[index % 3]
    )


def test_jsonl_regression_with_separate_validation_and_test_files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", *({"a": f"s{i}", "b": f"t{i}", "score": i / 4} for i in range(8)))
    validation = write_jsonl(tmp_path / "dev.jsonl", {"a": "x", "b": "y", "score": "2.5"})
    test = write_jsonl(tmp_path / "test.jsonl", {"a": "u", "b": "v", "score": 3})
    spec = DataConfig(source=str(train), task_type="regression", text_columns=["a", "b"], label_column="score",
                      validation_source=str(validation), test_source=str(test))
    data = load_dataset(spec)
    assert data.labels == () and data.num_labels == 1
    assert [e.label for e in data.train] == [i / 4 for i in range(8)]  # nothing carved: file order kept
    assert data.validation == (TextExample("x", "y", 2.5),) and data.test == (TextExample("u", "v", 3.0),)


def test_jsonl_causal_lm_needs_only_text(tmp_path):
    path = write_jsonl(tmp_path / "notes.jsonl", *({"text": f"line {i}"} for i in range(10)))
    data = load_dataset(DataConfig(source=str(path), task_type="causal_lm"))
    assert sum(len(getattr(data, part)) for part in PARTS) == 10
    assert {e.label for e in data.train} == {None}


def test_labels_sort_numerically_and_an_explicit_list_sets_the_order(tmp_path):
    path = write_csv(tmp_path / "stars.csv", "text,stars", *(f"review {i},{(2, 10, 1)[i % 3]}" for i in range(30)))
    assert load_dataset(DataConfig(source=str(path), label_column="stars")).labels == ("1", "2", "10")
    explicit = load_dataset(DataConfig(source=str(path), label_column="stars", labels=["10", "2", "1"]))
    assert explicit.labels == ("10", "2", "1")


def test_duplicate_texts_are_dropped_before_carving(tmp_path):
    path = write_csv(tmp_path / "dups.csv", "text,label", *reviews(20), *reviews(20))
    data = load_dataset(DataConfig(source=str(path)))
    texts = [e.text for part in PARTS for e in getattr(data, part)]
    assert len(texts) == len(set(texts)) == 20


# --- errors name the file, the line and the column ---


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(DataConfig(source=str(tmp_path / "absent.csv")))


@pytest.mark.parametrize("content", ["", "text,label\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "empty.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=r"empty\.csv' has no data rows"):
        load_dataset(DataConfig(source=str(path)))


def test_missing_column_lists_the_columns_present(tmp_path):
    path = write_csv(tmp_path / "reviews.csv", "review,label", "great,pos")
    with pytest.raises(
        DataError, match=r"reviews\.csv line 2: no column 'text'; columns present: \['review', 'label'\]"
    ):
        load_dataset(DataConfig(source=str(path)))


def test_missing_key_in_a_jsonl_row(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", {"text": "fine", "label": "pos"}, {"text": "no label"})
    with pytest.raises(DataError, match=r"rows\.jsonl line 2: no column 'label'; columns present: \['text'\]"):
        load_dataset(DataConfig(source=str(path)))


def test_a_single_class_is_not_a_classification_task(tmp_path):
    path = write_csv(tmp_path / "one.csv", "text,label", "good,pos", "fine,pos")
    with pytest.raises(DataError, match=r"one\.csv': classification needs at least 2 labels, found \['pos'\]"):
        load_dataset(DataConfig(source=str(path)))


def test_unknown_label_in_validation_file(tmp_path):
    train = write_csv(tmp_path / "train.csv", "text,label", *reviews(6))
    dev = write_csv(tmp_path / "dev.csv", "text,label", "fine,pos", "meh,neutral")
    with pytest.raises(DataError, match=r"dev\.csv line 3: label 'neutral' is not one of the labels \['neg', 'pos'\]"):
        load_dataset(DataConfig(source=str(train), validation_source=str(dev)))


def test_non_numeric_regression_target(tmp_path):
    path = write_csv(tmp_path / "scores.csv", "text,score", "good,4.5", "bad,low")
    with pytest.raises(DataError, match=r"scores\.csv line 3: regression target 'low' is not a finite number"):
        load_dataset(DataConfig(source=str(path), task_type="regression", label_column="score"))


def test_empty_text(tmp_path):
    path = write_csv(tmp_path / "blank.csv", "text,label", "good,pos", '"  ",neg')
    with pytest.raises(DataError, match=r"blank\.csv line 3: column 'text' has an empty text"):
        load_dataset(DataConfig(source=str(path)))


def test_empty_label(tmp_path):
    path = write_csv(tmp_path / "unlabelled.csv", "text,label", "good,pos", "bad,")
    with pytest.raises(DataError, match=r"unlabelled\.csv line 3: column 'label' has an empty label"):
        load_dataset(DataConfig(source=str(path)))


def test_invalid_json_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok", "label": "pos"}\n{"text": "cut\n')
    with pytest.raises(DataError, match=r"broken\.jsonl line 2: invalid JSON"):
        load_dataset(DataConfig(source=str(path)))


def test_unsupported_extension(tmp_path):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    with pytest.raises(DataError, match="unsupported extension '.parquet'"):
        load_dataset(DataConfig(source=str(path)))
