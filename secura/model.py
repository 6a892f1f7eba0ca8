"""The SECURA tuner and the training loop's calls: merges and S-MagNorm statistics.

The merge API is these module functions: :func:`merge_step` after every optimiser step, :func:`end_task` at the
end of a task. S statistics: wrap each *training* forward in :func:`magnorm_token_mask` with the batch's attention
mask, read them with :func:`magnorm_stats`. Each works on a PeftModel, a SecuraModel, or any module holding SECURA
layers (under DDP or FSDP too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import nn

from .cur_layer import CurTuner
from .layer import SecuraLayer
from .magnorm import combine_moments, summarise_stats


class SecuraModel(CurTuner):
    """Injects :class:`SecuraLayer` (``SecuraConfig``) into ``nn.Linear`` and transformers ``Conv1D`` modules."""

    prefix: str = "secura_"
    tuner_layer_cls = SecuraLayer
    method_label = "SECURA"


def secura_layers(model: nn.Module) -> Iterator[SecuraLayer]:
    """All SECURA layers of a model."""
    return (m for m in model.modules() if isinstance(m, SecuraLayer))


def merge_step(model: nn.Module, global_step: int, optimizer: Any = None) -> bool:
    """Merge each active adapter whose ``merge_every`` divides ``global_step``; returns whether any merged.

    Call it after every ``optimizer.step()`` with the number of optimiser steps taken so far. Pass the optimizer
    when a config sets ``reset_b_optimizer_state``.
    """
    merged = False
    for layer in secura_layers(model):
        due = [name for name in layer.active_adapters if name in layer.secura_config
               and global_step % layer.secura_config[name].merge_every == 0]
        if due:
            layer.fold_live_update(due, optimizer=optimizer)
            merged = True
    return merged


def end_task(model: nn.Module, optimizer: Any = None) -> None:
    """End-of-task merge of the active adapters: afterwards B = 0 everywhere (for M1, plain base weights)."""
    for layer in secura_layers(model):
        layer.fold_live_update(None, optimizer=optimizer)


@contextlib.contextmanager
def magnorm_token_mask(model: nn.Module, attention_mask: torch.Tensor) -> Iterator[None]:
    """Record S statistics for the forwards inside this block, over the tokens where ``attention_mask`` is set.

    Wrap the training forward only (not evaluation, not the recomputation of activation checkpointing, which runs
    in the backward, outside the block)::

        with secura.magnorm_token_mask(model, batch["attention_mask"]):
            loss = model(**batch).loss

    The mask must have one entry per token the adapted layers see (batch × sequence). Outside the block nothing
    is recorded. The forward only adds to a buffer of each layer; the mask is handed over here, outside any
    compiled region.
    """
    layers = list(secura_layers(model))
    mask = attention_mask.detach().bool()
    for layer in layers:
        layer.token_mask = mask
    try:
        yield
    finally:
        for layer in layers:
            layer.token_mask = None


def magnorm_stats(model: nn.Module, reset: bool = False, adapter_name: Optional[str] = None) -> dict[str, float]:
    """S statistics over all layers (and adapters, unless one is named) since the last reset.

    Keys: ``s_mean``, ``s_std``, ``frac_le_m`` (S ≤ brake_threshold m), ``frac_ge_1_8``, ``brake_rate`` (share of
    tokens where the retention brake fired), ``elements``, ``tokens`` (summed over layers). Only tokens recorded
    inside :func:`magnorm_token_mask` count; NaN values when none were. Reading synchronises with the device once
    per layer; recording does not.
    """
    total: Optional[torch.Tensor] = None
    for layer in secura_layers(model):
        for name, acc in layer.secura_stats.items():
            if adapter_name is None or name == adapter_name:
                acc = acc.cpu()
                total = acc if total is None else combine_moments(total, acc)
    if reset:
        reset_magnorm_stats(model)
    return summarise_stats(total)


def reset_magnorm_stats(model: nn.Module) -> None:
    """Zero the S statistics of every SECURA layer."""
    for layer in secura_layers(model):
        for acc in layer.secura_stats.values():
            acc.zero_()
