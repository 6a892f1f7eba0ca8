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
from typing import Any

import yaml


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


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path``; what the block writes there replaces ``path`` only if it succeeds.

    The name carries the process id, so parallel writers of the same file never share a temp file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
