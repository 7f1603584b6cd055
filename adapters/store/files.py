"""Adapter directories on disk: `adapter_config.json` + `adapter_model.safetensors`.

Reading is defensive: sizes are bounded before anything is allocated, the
safetensors header is parsed and checked before tensor data is read, and no
file is ever unpickled. Every failure is one `AdapterFileError` naming the file.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from adapters.config import AdapterConfig
from adapters.errors import AdapterFileError
from adapters.store.atomic import write_atomic

if TYPE_CHECKING:  # torch loads only where tensors are read or written: the hub's listing needs none
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MAX_CONFIG_BYTES = 1 << 20  # 1 MiB: a config is a few KB
MAX_WEIGHTS_BYTES = 256 << 20  # 256 MiB: DCFT tensors are KBs; heads can be MBs
MAX_HEADER_BYTES = 1 << 20
ALLOWED_DTYPES = {"F32": 4, "F16": 2, "BF16": 2}  # safetensors dtype -> bytes per element


def read_bounded(path: Path, limit: int) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise AdapterFileError(f"{path}: missing") from None
    if size > limit:
        raise AdapterFileError(f"{path}: {size} bytes exceeds the limit of {limit}")
    return path.read_bytes()


def read_adapter_config(adapter_dir: str | Path) -> AdapterConfig:
    """Parse and validate `adapter_config.json` (schema, version, types)."""
    path = Path(adapter_dir) / CONFIG_NAME
    raw = read_bounded(path, MAX_CONFIG_BYTES)
    try:
        return AdapterConfig.model_validate_json(raw)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(root)"
        raise AdapterFileError(f"{path}: field '{where}': {first['msg']}") from None


def parse_safetensors_header(blob: bytes, path: Path) -> dict[str, dict]:
    """Check the header of a safetensors payload without touching tensor data.

    Returns {name: {"dtype", "shape", "data_offsets"}}; rejects unknown dtypes,
    shapes whose byte size disagrees with their offsets, overlaps and gaps.
    """
    if len(blob) < 8:
        raise AdapterFileError(f"{path}: truncated ({len(blob)} bytes, no safetensors header)")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(blob):
        raise AdapterFileError(f"{path}: header declares {header_len} bytes but the file has {len(blob) - 8}")
    try:
        header = json.loads(blob[8 : 8 + header_len])
    except (ValueError, RecursionError):  # bad UTF-8/JSON, absurd nesting or integer size
        raise AdapterFileError(f"{path}: header is not valid JSON (not a safetensors file?)") from None
    if not isinstance(header, dict):
        raise AdapterFileError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_len = len(blob) - 8 - header_len
    spans = []
    for name, info in header.items():
        spans.append(_check_entry(name, info, path))
    spans.sort()
    cursor = 0
    for start, end, name in spans:
        if start != cursor:
            raise AdapterFileError(f"{path}: tensor '{name}' overlaps or leaves a gap at byte {cursor}")
        cursor = end
    if cursor != data_len:
        raise AdapterFileError(f"{path}: tensors cover {cursor} bytes but the data has {data_len}")
    return header


def _check_entry(name: str, info: object, path: Path) -> tuple[int, int, str]:
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise AdapterFileError(f"{path}: tensor '{name}' has a malformed header entry")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise AdapterFileError(f"{path}: tensor '{name}' has dtype {dtype}, expected one of {sorted(ALLOWED_DTYPES)}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise AdapterFileError(f"{path}: tensor '{name}' has a malformed shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise AdapterFileError(f"{path}: tensor '{name}' has malformed data_offsets {offsets!r}")
    if math.prod(max(d, 1) for d in shape) >= 1 << 62:  # an empty tensor too: its strides would overflow int64
        raise AdapterFileError(f"{path}: tensor '{name}' has a shape {shape} too large to index")
    start, end = offsets
    nbytes = math.prod(shape) * ALLOWED_DTYPES[dtype]
    if start < 0 or end - start != nbytes:
        raise AdapterFileError(
            f"{path}: tensor '{name}' of shape {shape} needs {nbytes} bytes, offsets give {end - start}"
        )
    return start, end, name


def read_adapter_tensors(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """Load the tensors of `adapter_model.safetensors`, checked and all finite."""
    path = Path(adapter_dir) / WEIGHTS_NAME
    blob = read_bounded(path, MAX_WEIGHTS_BYTES)
    parse_safetensors_header(blob, path)
    import torch  # here, not at the top: see TYPE_CHECKING above
    from safetensors.torch import load as load_safetensors_bytes

    try:
        tensors = load_safetensors_bytes(blob)
    except Exception as err:  # safetensors raises its own SafetensorError
        raise AdapterFileError(f"{path}: unreadable safetensors payload: {err}") from None
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise AdapterFileError(f"{path}: tensor '{name}' holds NaN or Inf values")
    return tensors


def adapter_digest(adapter_dir: str | Path) -> str:
    """Content digest of an adapter directory: sha256 over both files' bytes."""
    outer = hashlib.sha256()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        blob = read_bounded(Path(adapter_dir) / name, MAX_WEIGHTS_BYTES)
        outer.update(name.encode() + b"\0" + hashlib.sha256(blob).digest())
    return outer.hexdigest()


def write_adapter_dir(adapter_dir: str | Path, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> Path:
    """Write both files, each atomically (`adapters.store.atomic`), and return the directory."""
    from safetensors.torch import save as save_safetensors_bytes

    out = Path(adapter_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    write_atomic(out / WEIGHTS_NAME, save_safetensors_bytes(payload))
    write_atomic(out / CONFIG_NAME, config.model_dump_json(indent=2).encode())
    return out
