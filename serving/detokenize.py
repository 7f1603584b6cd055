"""Token ids to text, incrementally, with stop strings honoured across chunk boundaries."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TextStream:
    """Push tokens, get the text that is safe to send: text that may still turn into a stop
    string, or that ends in a partial UTF-8 character, is held back until it is settled."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.text = ""  # the whole text so far (cut at a stop string once one appears)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one token; returns the new text that may be sent (possibly empty)."""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut], True
            return self._flush(len(self.text))
        self.text = text
        return self._flush(self._settled(text))

    def finish(self) -> str:
        """The rest of the text, once no token will follow."""
        return self._flush(len(self.text.rstrip("\ufffd")) if not self.stopped else len(self.text))

    def _settled(self, text: str) -> int:
        end = len(text.rstrip("\ufffd"))  # U+FFFD: bytes of a character still to come
        held = max((k for s in self.stop for k in range(1, len(s)) if text[:end].endswith(s[:k])), default=0)
        return end - held

    def _flush(self, upto: int) -> str:
        piece = self.text[self.sent:upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        return piece
