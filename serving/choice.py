"""One choice of a completion while it decodes: the one place that seeds a choice, picks its next
token, turns the token into text, and decides when and why the choice ends (OpenAI's finish
reasons). The static batch (`generation.py`) and the continuous decoder (`decoder.py`) both step
their choices through it, so the two decode alike by construction."""

from __future__ import annotations

from collections import Counter

import torch
from transformers import PreTrainedTokenizerBase

from serving.calls import DecodeEvent
from serving.detokenize import TextStream
from serving.rows import Sampling, TokenLogprob
from serving.sampling import choose, generator_for, nth_choice


class Choice:
    """`nth`: the choice's place among its prompt's n (seeds it); `index`: its place in the call's answer."""

    def __init__(self, sampling: Sampling, nth: int, index: int, tokenizer: PreTrainedTokenizerBase,
                 eos: set[int], device: torch.device):
        self.sampling = nth_choice(sampling, nth)
        self.index = index
        self.generator = generator_for(self.sampling, device)
        self.counts: Counter[int] = Counter()  # tokens made so far (the penalties read them)
        self.made = 0
        self.last: int | None = None  # the last token made: the next step's input
        self.finish_reason: str | None = None
        self._tokenizer, self._eos = tokenizer, eos
        self._text = TextStream(tokenizer, self.sampling.stop)

    def choose(self, logits: torch.Tensor) -> tuple[int, TokenLogprob | None]:
        """The next token from this step's logits (and its logprobs, if the call asked)."""
        return choose(logits, self.sampling, self.generator, self.counts, self._tokenizer)

    def accept(self, token: int, logprob: TokenLogprob | None = None, prompt_tokens: int = 0) -> DecodeEvent:
        """Take the chosen token: the step's event, whose finish reason is set once the choice is done
        (EOS or a stop string: "stop"; max_tokens made: "length"). EOS is not part of the answer."""
        text, kept = "", token not in self._eos
        if not kept:
            self.finish_reason = "stop"
        else:
            self.made += 1
            self.counts[token] += 1
            self.last = token
            text = self._text.push(token)
            if self._text.stopped:
                self.finish_reason = "stop"
            elif self.made >= self.sampling.max_tokens:
                self.finish_reason = "length"
        if self.finish_reason:
            text += self._text.finish()  # what was held back for a stop string that never came
        return DecodeEvent(self.index, text, (token,) if kept else (), (logprob,) if logprob and kept else (),
                           self.finish_reason, prompt_tokens)
