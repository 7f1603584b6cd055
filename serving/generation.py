"""Static batching (kept for comparison: `EngineConfig.batching = "static"`): one padded
batch decodes until its longest row is done. Each row keeps its own sampling settings
(and, through the slot index the engine sets around this call, its own adapter) at every
step, and decodes exactly as the continuous decoder does (`serving/sampling.py`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from serving.detokenize import TextStream
from serving.rows import GenerateRow, Generation
from serving.sampling import choose, generator_for


def _append(out: Generation, stream: TextStream, row: GenerateRow, token: int, logprob, eos: set[int],
            counts: Counter[int]) -> None:
    """One token for one row; sets finish_reason at EOS, a stop string or the length limit."""
    if token in eos:
        out.finish_reason = "stop"
    else:
        out.tokens.append(token)
        counts[token] += 1
        if logprob is not None:
            out.logprobs.append(logprob)
        out.text += stream.push(token)
        if stream.stopped:
            out.finish_reason = "stop"
        elif len(out.tokens) >= row.sampling.max_tokens:
            out.finish_reason = "length"
    if out.finish_reason:
        out.text += stream.finish()


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
    streams = [TextStream(tokenizer, row.sampling.stop) for row in rows]
    generators = [generator_for(row.sampling, device) for row in rows]
    counts = [Counter() for _ in rows]
    step = model(input_ids=encoded["input_ids"], attention_mask=mask, position_ids=positions,
                 past_key_values=DynamicCache(), use_cache=True)
    for _ in range(max(row.sampling.max_tokens for row in rows)):
        tokens = []
        for i, row in enumerate(rows):
            token, logprob = choose(step.logits[i, -1], row.sampling, generators[i], counts[i], tokenizer)
            tokens.append(token)
            if outs[i].finish_reason is None:
                _append(outs[i], streams[i], row, token, logprob, eos, counts[i])
        if all(out.finish_reason for out in outs):
            break
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
        positions = positions[:, -1:] + 1
        step = model(input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=mask,
                     position_ids=positions, past_key_values=step.past_key_values, use_cache=True)
    return outs
