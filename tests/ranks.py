"""Forked gloo ranks, for the tests that check what every DDP/FSDP rank ends with."""
from __future__ import annotations

import socket
from typing import Any, Callable

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Callable[..., None], out: str, *args: Any, world: int = 2) -> list[Any]:
    """Fork ``world`` ranks of ``worker(rank, port, out, *args)``, each saving to ``f"{out}.{rank}"``; their results."""
    import torch.multiprocessing as mp

    import pipelines.parallel  # noqa: F401 - imported before the fork, inherited by the workers

    mp.start_processes(worker, args=(free_port(), out, *args), nprocs=world, join=True, start_method="fork")
    return [torch.load(f"{out}.{rank}", weights_only=True) for rank in range(world)]
