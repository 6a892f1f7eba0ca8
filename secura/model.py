"""SECURA tuner (injection into a model) and the training-loop hooks: periodic merges and S statistics."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .config import SecuraConfig
from .cur import layer_seed
from .layer import Linear, SecuraLayer, linear_shape
from .magnorm import MagNormStats, combine_moments


class SecuraModel(BaseTuner):
    """Injects SECURA layers (``SecuraConfig``) into ``nn.Linear`` and transformers ``Conv1D`` modules.

    Beyond the peft tuner API it offers :meth:`secura_merge` (call every ``merge_every`` optimiser steps and at the
    end of each task; :func:`merge_step` and :func:`end_task` do the bookkeeping) and :meth:`magnorm_stats`.
    """

    prefix: str = "secura_"
    tuner_layer_cls = SecuraLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    def _create_and_replace(
        self,
        config: SecuraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        if current_key is None:
            raise ValueError("Current Key shouldn't be `None`")
        seed = layer_seed(config.cur_seed, current_key)
        try:
            if isinstance(target, SecuraLayer):
                target.update_layer(adapter_name, config, seed=seed)
                return
            new_module = self._create_new_module(config, adapter_name, target, seed)
        except ValueError as err:
            raise ValueError(f"SECURA cannot adapt '{current_key}': {err}") from err
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    @staticmethod
    def _create_new_module(config: SecuraConfig, adapter_name: str, target: nn.Module, seed: int) -> Linear:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        _, _, fan_in_fan_out = linear_shape(base)
        if config.fan_in_fan_out and not fan_in_fan_out:  # Conv1D is detected; only this case is a user error
            warnings.warn(f"SecuraConfig.fan_in_fan_out=True but {type(base).__name__} stores (out, in); ignored.")
        return Linear(target, adapter_name, config, seed=seed)

    def secura_merge(self, adapter_name: Optional[Union[str, list[str]]] = None, optimizer: Any = None) -> None:
        """Fold A·B into the accumulated core and reset B, in every layer (default: the active adapters)."""
        merge_adapters(self.model, adapter_name, optimizer)

    def magnorm_stats(self, reset: bool = False) -> dict[str, float]:
        """S statistics aggregated over all layers since the last reset (see :func:`magnorm_stats`)."""
        return magnorm_stats(self.model, reset=reset)

    def reset_magnorm_stats(self) -> None:
        reset_magnorm_stats(self.model)


def secura_layers(model: nn.Module) -> Iterator[SecuraLayer]:
    """All SECURA layers of a model (a PeftModel, a SecuraModel or a model with injected layers)."""
    return (m for m in model.modules() if isinstance(m, SecuraLayer))


def merge_adapters(
    model: nn.Module, adapter_name: Optional[Union[str, list[str]]] = None, optimizer: Any = None
) -> None:
    """Run the SECURA merge (§4) of the given adapters (default: active) in every layer."""
    names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
    for layer in secura_layers(model):
        layer.secura_merge(names, optimizer=optimizer)


def merge_step(model: nn.Module, global_step: int, optimizer: Any = None) -> bool:
    """Merge each active adapter whose ``merge_every`` divides ``global_step``; returns whether any merged.

    Call it after every ``optimizer.step()`` with the number of optimiser steps taken so far. Pass the optimizer
    when a config sets ``reset_b_optimizer_state``.
    """
    merged = False
    for layer in secura_layers(model):
        due = [n for n in layer.active_adapters if n in layer.secura_config
               and global_step % layer.secura_config[n].merge_every == 0]
        if due:
            layer.secura_merge(due, optimizer=optimizer)
            merged = True
    return merged


def end_task(model: nn.Module, optimizer: Any = None) -> None:
    """End-of-task merge of the active adapters: afterwards B = 0 everywhere (for M1, plain base weights)."""
    merge_adapters(model, None, optimizer)


def magnorm_stats(model: nn.Module, reset: bool = False, adapter_name: Optional[str] = None) -> dict[str, float]:
    """S statistics over all layers (and adapters, unless one is named) since the last reset.

    Keys: ``s_mean``, ``s_std``, ``frac_le_m`` (S ≤ threshold m), ``frac_ge_1_8``, ``brake_rate`` (fraction of
    token-rows where the retention brake fired), ``elements``, ``tokens``. NaN values when nothing was recorded.
    Reading synchronises with the device once per layer; recording does not.
    """
    total: Optional[torch.Tensor] = None
    for layer in secura_layers(model):
        for name, stats in layer.secura_stats.items():
            acc = stats.totals()
            if acc is None or (adapter_name is not None and name != adapter_name):
                continue
            acc = acc.cpu()
            total = acc if total is None else combine_moments(total, acc)
    if reset:
        reset_magnorm_stats(model)
    return MagNormStats.summarise(total)


def reset_magnorm_stats(model: nn.Module) -> None:
    for layer in secura_layers(model):
        for stats in layer.secura_stats.values():
            stats.reset()


def set_magnorm_stats_enabled(model: nn.Module, enabled: bool = True) -> None:
    """Turn the (cheap, on-device) recording of S statistics on or off in every layer."""
    for layer in secura_layers(model):
        for stats in layer.secura_stats.values():
            stats.enabled = enabled
