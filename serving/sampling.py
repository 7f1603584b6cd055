"""Choosing each row's next token: OpenAI's logit bias and presence/frequency penalties,
then greedy or temperature + nucleus sampling, and the logprobs a client asked for.
Shared by the continuous decoder and the static one, so both decode the same way."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import torch

from serving.rows import Sampling, TokenLogprob

GREEDY_BELOW = 1e-4  # temperatures below this are greedy (and 1/T would overflow)


def nth_choice(sampling: Sampling, i: int) -> Sampling:
    """The settings of a call's i-th choice: seeded choices differ, each still reproducible."""
    return replace(sampling, seed=sampling.seed + i) if sampling.seed is not None and i else sampling


def generator_for(sampling: Sampling, device: torch.device) -> torch.Generator | None:
    """A seeded generator for reproducible sampling; None: greedy, or unseeded."""
    if sampling.temperature < GREEDY_BELOW or sampling.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(sampling.seed)


def is_plain_greedy(sampling: Sampling) -> bool:
    """Greedy with nothing that changes or reports the logits: the token is their argmax, which a
    decoder can take for all such rows at once (one device sync per step, not one per row)."""
    return (sampling.temperature < GREEDY_BELOW and not sampling.logit_bias and sampling.logprobs is None
            and not sampling.presence_penalty and not sampling.frequency_penalty)


def adjusted(logits: torch.Tensor, sampling: Sampling, generated: Counter[int]) -> torch.Tensor:
    """One row's logits (float32 copy) after logit bias and penalties."""
    logits = logits.float().clone()
    for token, bias in sampling.logit_bias:
        if token < logits.numel():
            logits[token] += bias
    if generated and (sampling.presence_penalty or sampling.frequency_penalty):
        tokens = torch.tensor(list(generated), device=logits.device)
        counts = torch.tensor(list(generated.values()), device=logits.device, dtype=logits.dtype)
        logits[tokens] -= sampling.presence_penalty + sampling.frequency_penalty * counts
    return logits


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """Greedy below GREEDY_BELOW, else temperature + nucleus (top_p) sampling."""
    if sampling.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = (logits / sampling.temperature).softmax(-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p
        keep[0] = True  # the top token always stays, however small top_p rounds
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def logprob_of(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability under the adjusted distribution, and the top `top`."""
    logprobs = logits.log_softmax(-1)
    best = logprobs.topk(top) if top else None
    pairs = tuple(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else ()
    return TokenLogprob(token, float(logprobs[token]), pairs)


def choose(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None,
           generated: Counter[int], tokenizer) -> tuple[int, TokenLogprob | None]:
    """One row's next token, and its logprobs (with the tokens as text) when the row asked."""
    row = adjusted(logits, sampling, generated)
    token = pick(row, sampling, generator)
    if sampling.logprobs is None:
        return token, None
    found = logprob_of(row, token, sampling.logprobs)
    as_text = [tokenizer.decode([t]) for t in (token, *(t for t, _ in found.top))]
    return token, replace(found, text=as_text[0], top_text=tuple(as_text[1:]))
