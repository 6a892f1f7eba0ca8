"""One run per output folder (pipelines/folder_lock.py): a held folder is refused at once, naming its holder;
a stale holder record (its process died, the OS lock is free) is taken over with a warning."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from pipelines.folder_lock import HOLDER, LOCK, FolderInUse, StaleLockWarning, folder_lock

HOLD = "import sys, time; from pipelines.folder_lock import folder_lock\n" \
       "with folder_lock(sys.argv[1], 'secura run'):\n    print('held', flush=True); time.sleep(60)"


def test_a_held_folder_is_refused_naming_the_folder_and_its_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(FolderInUse, match=rf"{tmp_path} is in use by secura run \(pid {holder.pid} on "
                                              rf"{socket.gethostname()}, since .*\)"):
            with folder_lock(tmp_path, "secura run"):
                pass
        assert time.monotonic() - started < 1, "at once, not after a wait"
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(StaleLockWarning, match=rf"{tmp_path}: taking over the lock of secura run \(pid {holder.pid}"):
        with folder_lock(tmp_path, "secura compare"):  # SIGKILLed: the OS freed the lock, its record stayed
            assert json.loads((tmp_path / HOLDER).read_text())["pid"] == os.getpid()
    assert not (tmp_path / HOLDER).exists() and (tmp_path / LOCK).exists()


def test_the_lock_is_released_when_the_block_fails(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with folder_lock(tmp_path, "secura run"):
            raise RuntimeError("boom")
    with warnings.catch_warnings():
        warnings.simplefilter("error", StaleLockWarning)  # no warning: the record went with the lock
        with folder_lock(tmp_path, "secura run"):
            pass
