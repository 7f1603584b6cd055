"""Batched decoding where each row keeps its own sampling settings (and, through the
slot index the engine sets around this call, its own adapter) at every step."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from serving.rows import GenerateRow, Generation, Sampling


def _pick_tokens(
    logits: torch.Tensor, rows: Sequence[GenerateRow], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Greedy for temperature 0, else temperature + nucleus sampling, row by row settings."""
    picked = logits.argmax(-1)
    for i, row in enumerate(rows):
        sampling = row.sampling
        if sampling.temperature < 1e-4:  # below this, sampling is greedy (and 1/T would overflow)
            continue
        probs = (logits[i].float() / sampling.temperature).softmax(-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p
            keep[0] = True  # the top token always stays, however small top_p rounds
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        picked[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return picked


def _generators(rows: Sequence[GenerateRow], device: torch.device) -> list[torch.Generator | None]:
    gens = []
    for row in rows:
        gen = None
        if row.sampling.temperature > 0 and row.sampling.seed is not None:
            gen = torch.Generator(device=device).manual_seed(row.sampling.seed)
        gens.append(gen)
    return gens


def _finish(out: Generation, tokenizer: PreTrainedTokenizerBase, sampling: Sampling, token: int, eos: set[int]) -> None:
    """Append one token; set finish_reason when the row hits EOS, a stop string or its length."""
    if token in eos:
        out.finish_reason = "stop"
        return
    out.tokens.append(token)
    if sampling.stop:
        text = tokenizer.decode(out.tokens, skip_special_tokens=True)
        cut = min((text.find(s) for s in sampling.stop if s in text), default=-1)
        if cut >= 0:
            out.text, out.finish_reason = text[:cut], "stop"
            return
    if len(out.tokens) >= sampling.max_tokens:
        out.finish_reason = "length"


@torch.inference_mode()
def generate(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: Sequence[GenerateRow]
) -> list[Generation]:
    """Left-padded prompt token ids, one KV cache for the batch, per-row stopping."""
    device = next(model.parameters()).device
    prompts = [{"input_ids": list(row.prompt_ids)} for row in rows]
    # Left padding: every row's next token follows its prompt's last token.
    encoded = tokenizer.pad(prompts, padding_side="left", return_tensors="pt").to(device)
    mask = encoded["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    outs = [Generation(prompt_tokens=int(n)) for n in mask.sum(-1).tolist()]
    configured = model.generation_config.eos_token_id
    eos = {tokenizer.eos_token_id, *([configured] if isinstance(configured, int) else configured or [])} - {None}
    generators = _generators(rows, device)
    step = model(input_ids=encoded["input_ids"], attention_mask=mask, position_ids=positions,
                 past_key_values=DynamicCache(), use_cache=True)
    for _ in range(max(row.sampling.max_tokens for row in rows)):
        tokens = _pick_tokens(step.logits[:, -1], rows, generators)
        for out, row, token in zip(outs, rows, tokens.tolist(), strict=True):
            if out.finish_reason is None:
                _finish(out, tokenizer, row.sampling, token, eos)
        if all(out.finish_reason for out in outs):
            break
        mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=-1)
        positions = positions[:, -1:] + 1
        step = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                     past_key_values=step.past_key_values, use_cache=True)
    for out in outs:
        if not out.text:
            out.text = tokenizer.decode(out.tokens, skip_special_tokens=True)
        out.finish_reason = out.finish_reason or "length"
    return outs
