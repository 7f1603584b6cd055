"""Loading a backbone: the device, the tokenizer, the model for a task, and its identity."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from adapters.config import BaseModelRef
from adapters.errors import AdapterConfigError, AdapterError
from backbones.shipped import ALIASES, MINILM, SMOLLM2, minilm_dir, resolve_model_dir, smollm2_cache_dir

BackboneTask = Literal["seq_cls", "regression", "causal_lm"]
logger = logging.getLogger(__name__)


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """CUDA when available, else CPU; an explicit choice is honoured or refused clearly."""
    if prefer is None or prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(prefer)
    except (RuntimeError, TypeError) as err:
        raise AdapterConfigError(f"unknown device '{prefer}': {err}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AdapterConfigError(f"device '{prefer}' was asked for, but CUDA is not available here")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AdapterConfigError(
                f"device '{prefer}' was asked for, but only {torch.cuda.device_count()} GPU(s) exist"
            )
    return device


def load_tokenizer(model_dir: str | Path) -> PreTrainedTokenizerBase:
    """The folder's tokenizer, with a pad token (eos if it had none) so batches can be padded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise AdapterError(f"tokenizer in '{model_dir}' has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def is_causal_lm(model_config: Any) -> bool:
    """Whether a transformers config describes a causal LM (by its architecture names)."""
    return any(arch.endswith(("ForCausalLM", "LMHeadModel")) for arch in model_config.architectures or [])


def load_backbone(
    model_dir: str | Path,
    task_type: BackboneTask,
    num_labels: int | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """The transformers model for a task, in eval mode on `device`.

    seq_cls and regression put a freshly initialised head (`classifier`/`score`)
    on the backbone; that is expected and not reported. Any other missing weight is.
    """
    auto_class, kwargs = _head_for(task_type, num_labels)
    target = pick_device(device)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        with _load_reports_muted():
            model, info = auto_class.from_pretrained(
                model_dir, dtype=dtype, local_files_only=True, output_loading_info=True, **kwargs
            )
    except (OSError, ValueError) as err:
        raise AdapterError(f"cannot load a {task_type} model from '{model_dir}': {err}") from err
    fresh_head = task_type != "causal_lm"
    _warn_missing_backbone_weights(model, info["missing_keys"], model_dir, fresh_head)
    if model.config.pad_token_id is None:
        eos = model.config.eos_token_id
        model.config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return model.to(target).eval()


def _head_for(task_type: BackboneTask, num_labels: int | None) -> tuple[Any, dict[str, Any]]:
    if task_type == "seq_cls":
        if num_labels is None or num_labels < 2:
            raise AdapterConfigError(f"seq_cls needs num_labels >= 2, got {num_labels}")
        return AutoModelForSequenceClassification, {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    if task_type == "regression":
        if num_labels not in (None, 1):
            raise AdapterConfigError(f"regression predicts one value: num_labels must be 1 or None, got {num_labels}")
        kwargs = {"num_labels": 1, "problem_type": "regression", "ignore_mismatched_sizes": True}
        return AutoModelForSequenceClassification, kwargs
    if task_type == "causal_lm":
        if num_labels is not None:
            raise AdapterConfigError(f"causal_lm takes no num_labels, got {num_labels}")
        return AutoModelForCausalLM, {}
    raise AdapterConfigError(f"unknown task_type '{task_type}': expected seq_cls, regression or causal_lm")


class _DropLoadReports(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


@contextlib.contextmanager
def _load_reports_muted() -> Iterator[None]:
    # transformers logs a table for every missing key, fresh heads included; we check the keys ourselves.
    # The filter sits on a shared logger, so a concurrent load in another thread is muted too.
    transformers_logger = logging.getLogger("transformers.modeling_utils")
    report_filter = _DropLoadReports()
    transformers_logger.addFilter(report_filter)
    try:
        yield
    finally:
        transformers_logger.removeFilter(report_filter)


def _warn_missing_backbone_weights(
    model: PreTrainedModel, missing: set[str], model_dir: str | Path, fresh_head: bool
) -> None:
    prefix = model.base_model_prefix + "."
    head = {name for name, _ in model.named_parameters() if not name.startswith(prefix)} if fresh_head else set()
    absent = sorted(set(missing) - head)
    if absent:
        logger.warning(
            "%d weight(s) of %s were not in '%s' and start random: %s",
            len(absent), type(model).__name__, model_dir, ", ".join(absent[:5]),
        )


def backbone_ref(model_dir: str | Path, config: Any = None) -> BaseModelRef:
    """Identity of a backbone: its alias (or folder name) and a digest of its architecture."""
    if config is None:
        config = AutoConfig.from_pretrained(resolve_model_dir(model_dir), local_files_only=True)
    return BaseModelRef.from_model_config(_readable_name(model_dir), config)


def _readable_name(model_dir: str | Path) -> str:
    if str(model_dir) in ALIASES:
        return str(model_dir)
    folder = Path(model_dir).expanduser().resolve()
    for alias, locate in ((MINILM, minilm_dir), (SMOLLM2, smollm2_cache_dir)):
        with contextlib.suppress(AdapterError, OSError):
            if locate().resolve() == folder:
                return alias
    return folder.name
