"""Byte-level I/O relative to a hub root: one class per kind of storage.

Local paths (and file:// URLs): every write goes through `adapters.store.atomic`
(temp file, fsync, rename or link), so a reader never sees a prefix. Object stores:
each file is one PUT, which the store makes visible whole or not at all; `create` uses
`pipe_file(mode="create")`, which is exclusive where the backend maps it to a
conditional write (If-None-Match / ifGenerationMatch=0 in recent s3fs / gcsfs); on
older backends it is check-then-write with a small race window.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import fsspec
from fsspec.implementations.local import LocalFileSystem

from adapters.errors import RegistryUnavailableError
from adapters.store.atomic import create_exclusive, write_atomic


@contextlib.contextmanager
def io_errors(url: str, action: str) -> Iterator[None]:
    """Report store failures (unreachable bucket, permissions, a file in the way) as RegistryError."""
    try:
        yield
    except OSError as err:
        raise RegistryUnavailableError(f"hub {url!r}: {action} failed: {err}") from err


class Store(Protocol):
    """What the hub needs of its storage; paths are relative to the hub root."""

    def read(self, rel: str) -> bytes: ...

    def write(self, rel: str, data: bytes) -> None: ...

    def create(self, rel: str, data: bytes) -> bool: ...

    def names(self, rel: str) -> list[str]: ...

    def remove_tree(self, rel: str) -> None: ...


class LocalStore:
    """A hub on a POSIX filesystem: temp file + fsync + rename/link for atomicity."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def write(self, rel: str, data: bytes) -> None:
        """Whole-or-nothing overwrite: readers see the old bytes or the new, never a prefix."""
        write_atomic(self.root / rel, data)

    def create(self, rel: str, data: bytes) -> bool:
        """Exclusive whole-or-nothing create; False if `rel` already exists."""
        return create_exclusive(self.root / rel, data)

    def names(self, rel: str) -> list[str]:
        try:
            return os.listdir(self.root / rel)
        except (FileNotFoundError, NotADirectoryError):
            return []

    def remove_tree(self, rel: str) -> None:
        shutil.rmtree(self.root / rel, ignore_errors=True)


class FsspecStore:
    """A hub on any fsspec filesystem (object stores): one PUT per file, no renames."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs, self.root = fs, root.rstrip("/")

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def write(self, rel: str, data: bytes) -> None:
        # A single PUT (or a completed multipart upload) becomes visible whole.
        self.fs.pipe_file(self._path(rel), data)

    def create(self, rel: str, data: bytes) -> bool:
        path = self._path(rel)
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except TypeError:  # fsspec < 2024.12 has no mode=: best effort, racy
            if self.fs.exists(path):
                return False
            self.fs.pipe_file(path, data)
        return True

    def names(self, rel: str) -> list[str]:
        path = self._path(rel)
        self.fs.invalidate_cache(path)  # listings decide N: never trust a cached one
        try:
            entries = self.fs.ls(path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in entries]

    def remove_tree(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(rel), recursive=True)


def open_store(url: str) -> Store:
    """The store for a hub URL: local paths and file:// get `LocalStore`, the rest fsspec."""
    fs, root = fsspec.core.url_to_fs(url)
    return LocalStore(root) if isinstance(fs, LocalFileSystem) else FsspecStore(fs, root)
