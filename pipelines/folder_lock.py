"""One run per output folder: an exclusive lock held for the run's whole lifetime.

Two runs in one folder would share its journal, stage states, progress file
and SQLite store, and each would record the other's results. `folder_lock`
takes an OS lock (`filelock`: ``flock`` on POSIX) on ``<folder>/.secura.lock``,
which the OS releases however the holder ends, SIGKILL included. Who holds it
(pid, host, command, since when) is written beside it in
``.secura.lock.holder``, so a second run fails at once naming the holder. A
holder file whose lock is free was left by a holder that died: that stale
lock is taken over with a warning.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from pipelines.files import write_text_atomic

LOCK = ".secura.lock"
HOLDER = ".secura.lock.holder"


class FolderInUse(RuntimeError):
    """Another process holds the output folder's lock."""


class StaleLockWarning(UserWarning):
    """The folder's last holder died without releasing its record; this run takes the folder over."""


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if holder is None:
        return "another process (starting; not yet recorded)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"{holder.get('command', 'secura')} (pid {holder.get('pid')} on {holder.get('host')}, since {since})"


@contextmanager
def folder_lock(folder: str | Path, command: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; `FolderInUse`, naming folder and holder, when another process has it."""
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    lock, holder_path = FileLock(str(folder / LOCK)), folder / HOLDER
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise FolderInUse(f"{folder} is in use by {_describe(_holder(holder_path))}: one run per output folder; "
                          f"wait for it to end or choose another output_dir") from None
    try:
        stale = _holder(holder_path)
        if stale is not None:
            warnings.warn(f"{folder}: taking over the lock of {_describe(stale)}, which ended without releasing it",
                          StaleLockWarning, stacklevel=3)
        write_text_atomic(holder_path, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                   "command": command, "argv": sys.argv, "since": time.time()}))
        yield
    finally:
        holder_path.unlink(missing_ok=True)
        lock.release()
