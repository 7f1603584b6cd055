"""A chat rendered as the backbone's prompt: one function, so training (loss on the assistant turns)
and serving (the prompt a chat completion continues) agree on every token."""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase


def render_chat(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]) -> str:
    """The tokenizer's own chat template with the generation prompt; a plain `role: content` layout
    where the tokenizer has none (small test models)."""
    if not tokenizer.chat_template:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
