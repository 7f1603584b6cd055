"""Turn text examples into tokenized features and a padding collator for Trainer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding, PreTrainedTokenizerBase

from adapters.config import TaskType
from training.data import TextExample


class Features(torch.utils.data.Dataset):
    """Tokenized examples, padded per batch by the collator (no padding stored)."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def tokenize(
    examples: Sequence[TextExample], tokenizer: PreTrainedTokenizerBase, task_type: TaskType, max_length: int
) -> Features:
    if not examples:  # a split the data config leaves empty (validation_fraction=0, no test file)
        return Features([])
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    has_pairs = any(p is not None for p in pairs)
    encoded = tokenizer(texts, pairs if has_pairs else None, truncation=True, max_length=max_length)
    rows = [{key: encoded[key][i] for key in encoded} for i in range(len(examples))]
    if task_type != "causal_lm":
        for row, example in zip(rows, examples, strict=True):
            row["labels"] = float(example.label) if task_type == "regression" else int(example.label)
    return Features(rows)


def collator_for(tokenizer: PreTrainedTokenizerBase, task_type: TaskType):
    if task_type == "causal_lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorWithPadding(tokenizer)
