"""Static batching (kept for comparison: `EngineConfig.batching = "static"`): one padded
batch decodes until its longest row is done. Each row keeps its own sampling settings
(and, through the slot index the engine sets around this call, its own adapter) at every
step, and decodes exactly as the continuous decoder does (`serving/choice.py`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from serving.calls import add_event
from serving.choice import Choice
from serving.rows import GenerateRow, Generation


@torch.inference_mode()
def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[GenerateRow], eos: set[int]
) -> list[Generation]:
    """Left-padded prompt token ids, one KV cache for the batch, per-row stopping."""
    device = next(model.parameters()).device
    prompts = [{"input_ids": list(row.prompt_ids)} for row in rows]
    # Left padding: every row's next token follows its prompt's last token.
    encoded = tokenizer.pad(prompts, padding_side="left", return_tensors="pt").to(device)
    mask = encoded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = [Generation(prompt_tokens=int(n)) for n in mask.sum(-1).tolist()]
    choices = [Choice(row.sampling, row.nth, i, tokenizer, eos, device) for i, row in enumerate(rows)]
    step = model(input_ids=encoded["input_ids"], attention_mask=mask, position_ids=positions,
                 past_key_values=DynamicCache(), use_cache=True)
    for _ in range(max(row.sampling.max_tokens for row in rows)):
        tokens = []
        for choice, out in zip(choices, outs, strict=True):
            if choice.finish_reason is None:
                token, logprob = choice.choose(step.logits[choice.index, -1])
                add_event(out, choice.accept(token, logprob))
            tokens.append(choice.last if choice.last is not None else next(iter(eos), 0))  # a done row's input is moot
        if all(choice.finish_reason for choice in choices):
            break
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
        positions = positions[:, -1:] + 1
        step = model(input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=mask,
                     position_ids=positions, past_key_values=step.past_key_values, use_cache=True)
    return outs
