"""Chat and prompt/completion examples as causal-LM features whose labels cover only what the model
should learn to say: the trained assistant turns, or the completion (and the end-of-sequence token
after it, so the model learns to stop). Everything else is labelled -100, which the loss ignores."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from adapters.store.job_data import ChatExample, PromptCompletion
from backbones.chat import render_chat
from training.features import Features

IGNORED = -100  # label of a token that carries no loss (transformers' convention)


def prompt_target_pairs(example: ChatExample | PromptCompletion,
                        tokenizer: PreTrainedTokenizerBase) -> list[tuple[str, str]]:
    """(prompt, target) per trained turn: a chat gives one per trained assistant message, its prompt
    rendered from the messages before it exactly as a chat completion's prompt is (backbones/chat.py)."""
    if isinstance(example, PromptCompletion):
        return [(example.prompt, example.completion)]
    pairs = []
    for index, ((_, content), trained) in enumerate(zip(example.messages, example.trained, strict=True)):
        if trained:
            before = [{"role": role, "content": text} for role, text in example.messages[:index]]
            pairs.append((render_chat(tokenizer, before), content))
    return pairs


def masked_row(prompt: list[int], target: list[int], max_length: int) -> dict[str, list[int]]:
    """input_ids = prompt + target, labels = -100s + target; a long row keeps the end of its prompt and
    at least half of max_length for the target, so no row is left without a label."""
    target = target[: max_length - min(len(prompt), max_length // 2)]
    prompt = prompt[len(prompt) - (max_length - len(target)):] if len(prompt) + len(target) > max_length else prompt
    ids = prompt + target
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [IGNORED] * len(prompt) + target}


def tokenize_supervised(examples: Sequence[ChatExample | PromptCompletion], tokenizer: PreTrainedTokenizerBase,
                        max_length: int) -> Features:
    rows = []
    for example in examples:
        for prompt, target in prompt_target_pairs(example, tokenizer):
            prompt_ids = tokenizer(prompt)["input_ids"]
            target_ids = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(masked_row(prompt_ids, target_ids, max_length))
    return Features(rows)


def supervised_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Pads on the right: input ids with the pad token, labels with -100."""
    tokenizer.padding_side = "right"
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORED, padding=True)
