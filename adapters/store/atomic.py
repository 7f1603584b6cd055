"""Whole-or-nothing, durable writes of one local file: the one write every local store uses.

A reader of the path sees the old bytes or the new, never a prefix: the data goes to a
fsynced temp file in the same folder (names starting with "." are temp files every
reader ignores), which is then renamed (or linked) into place and the folder fsynced.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_copy(path: Path, data: bytes) -> Path:
    """`data` in a fsynced temp file next to `path` (same filesystem, so rename/link work)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return Path(tmp)


def write_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data`: readers see the old bytes or the new, never a prefix."""
    tmp = temp_copy(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create `path` holding `data`, whole or not at all; False if it already exists."""
    tmp = temp_copy(path, data)
    try:
        # link(2) is atomic and fails with EEXIST: of concurrent creators exactly
        # one wins, and the name appears already holding the full content.
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    fsync_dir(path.parent)
    return True


def fsync_dir(path: Path) -> None:
    """Make a rename/link durable: it lives in the directory's own metadata."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
