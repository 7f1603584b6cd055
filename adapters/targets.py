"""Which linear layers of a transformers model a DCFT adapter targets.

Targets are presets (`all`, `attention`, `qv`, `ffn`), roles (`q`, `k`, `v`, `o`,
`ffn_in`, `ffn_out`) resolved per architecture, or regexes full-matched against
module names. Every item must match at least one layer, so a typo is an error.
"""

from __future__ import annotations

import re

from torch import nn
from transformers.pytorch_utils import Conv1D

from adapters.errors import TargetError

PRESETS: dict[str, tuple[str, ...]] = {
    "all": ("q", "k", "v", "o", "ffn_in", "ffn_out"),  # the paper's "ALL"
    "attention": ("q", "k", "v", "o"),
    "qv": ("q", "v"),
    "ffn": ("ffn_in", "ffn_out"),
}

_BERT = {
    "q": r"attention\.self\.query",
    "k": r"attention\.self\.key",
    "v": r"attention\.self\.value",
    "o": r"attention\.output\.dense",
    "ffn_in": r"intermediate\.dense",
    "ffn_out": r"layer\.\d+\.output\.dense",
}
_DEBERTA = {**_BERT, "q": r"attention\.self\.query_proj", "k": r"attention\.self\.key_proj",
            "v": r"attention\.self\.value_proj"}
# GPT-2 fuses q, k and v into one Conv1D (weights stored (in, out)).
_GPT2 = {"q": r"attn\.c_attn", "k": r"attn\.c_attn", "v": r"attn\.c_attn",
         "o": r"attn\.c_proj", "ffn_in": r"mlp\.c_fc", "ffn_out": r"mlp\.c_proj"}
_LLAMA = {"q": r"self_attn\.q_proj", "k": r"self_attn\.k_proj", "v": r"self_attn\.v_proj",
          "o": r"self_attn\.o_proj", "ffn_in": r"mlp\.(gate_proj|up_proj)",
          "ffn_out": r"mlp\.down_proj"}

ROLE_PATTERNS: dict[str, dict[str, str]] = {
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "camembert", "electra"), _BERT),
    "deberta-v2": _DEBERTA,
    "gpt2": _GPT2,
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "smollm3"), _LLAMA),
}
ROLES = tuple(PRESETS["all"])


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def out_in(module: nn.Module) -> tuple[int, int]:
    """(out, in) features of an adaptable layer: Linear stores (out, in), GPT-2's Conv1D (in, out)."""
    shape = tuple(module.weight.shape)
    return shape if isinstance(module, nn.Linear) else shape[::-1]


def expand_targets(targets: list[str], model_type: str) -> list[tuple[str, str]]:
    """(item, regex) pairs: presets and roles become this architecture's patterns."""
    expanded = []
    for item in targets:
        roles = PRESETS.get(item, (item,) if item in ROLES else None)
        if roles is None:
            expanded.append((item, item))
            continue
        if model_type not in ROLE_PATTERNS:
            raise TargetError(
                f"target '{item}' is a preset/role, but model_type '{model_type}' has no "
                f"preset (known: {sorted(ROLE_PATTERNS)}); name the modules by regex instead"
            )
        expanded += [(item, rf"(.*\.)?{ROLE_PATTERNS[model_type][role]}") for role in roles]
    return expanded


def find_target_layers(model: nn.Module, targets: list[str], exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Name -> module for every adaptable layer the targets match, in model order."""
    model_type = getattr(getattr(model, "config", None), "model_type", "")
    patterns = []
    for item, pattern in expand_targets(targets, model_type):
        try:
            patterns.append((item, re.compile(pattern)))
        except re.error as err:
            raise TargetError(f"target '{item}' is neither a preset, a role nor a valid regex: {err}") from None
    candidates = {
        name: module
        for name, module in model.named_modules()
        if is_adaptable(module) and not any(name == e or name.startswith(e + ".") for e in exclude)
    }
    found: dict[str, nn.Module] = {}
    for item in dict.fromkeys(item for item, _ in patterns):
        hits = [n for n in candidates if any(p.fullmatch(n) for i, p in patterns if i == item)]
        if not hits:
            sample = ", ".join(list(candidates)[:4])
            raise TargetError(
                f"target '{item}' matches no linear layer of this {model_type or 'model'} (layers look like: {sample})"
            )
        found.update((name, candidates[name]) for name in hits)
    return {name: found[name] for name in candidates if name in found}
