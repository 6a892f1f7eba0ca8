"""SIGTERM ends a command as Ctrl-C does.

Kubernetes, `timeout` and batch schedulers stop a process with SIGTERM. By
default it kills Python outright, and once Ray is up its own handler exits
from wherever the main thread was (the driver then dies by SIGABRT with
Ray's stack dump). Raised as `Terminated`, a `KeyboardInterrupt`, it unwinds
like Ctrl-C: training stops (a worker group at its next step boundary), the
checkpoints written so far are kept, the parent run ends KILLED, and the CLI
prints one line and exits 143.
"""
from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM."""

    exit_status = 128 + signal.SIGTERM

    def __str__(self) -> str:
        return "terminated (SIGTERM)"


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def stop_on_sigterm() -> None:
    """Handle SIGTERM as `Terminated` (again after `ray.init`, which installs its own handler)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)
