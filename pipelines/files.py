"""Files in and out: one YAML reader that names the file in its errors, one atomic writer.

Every config (run, stream, sweep, compare) is read through :func:`read_yaml`, so a
user who mistypes a path or breaks the YAML gets the same kind of message whatever
the file was for. Every result a later step or a resumed run reads back (journals,
run records, cached scores, weights) is written through :func:`atomic_path`: a crash
mid-write leaves the old file or none, never half of one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def read_yaml(path: str | Path, what: str, *, error: type[ValueError] = ValueError, mapping: bool = False) -> Any:
    """The YAML in ``path`` (an empty file reads as ``{}``).

    ``what`` names the file's role in the message ("run config", "stream"); ``error``
    is the exception raised for bad YAML and a non-mapping top level (with ``mapping``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML: {exc}") from None
    data = {} if data is None else data
    if mapping and not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


class WriteError(OSError):
    """Writing a file failed (a full disk, a read-only folder): unlike the OS's own error, it names the file."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Any OS error in the block becomes a `WriteError` naming ``path`` (a failed ``write`` names no file)."""
    try:
        yield
    except WriteError:
        raise
    except OSError as error:
        raise WriteError(error.errno, error.strerror or str(error), str(path)) from error


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; what the block writes there replaces ``path`` only if it succeeds.

    The name carries the process id, so parallel writers of the same file never share a temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with writing(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def content_hash(fs: "pafs.FileSystem", path: str) -> str:
    """The xxh3-128 hash of a file on a pyarrow filesystem: what shard and checkpoint markers record."""
    import xxhash

    hasher = xxhash.xxh3_128()
    with fs.open_input_stream(path) as stream:
        while chunk := stream.read(1 << 20):
            hasher.update(chunk)
    return hasher.hexdigest()
