"""The CUR layer and tuner that SECURA and CUR-LoRA share (spec §1, §7).

A CUR adapter on ``y = W x + b`` selects k rows and k columns of W (``cur.py``), keeps ``C = W[:, cols]`` and
``R = W[rows, :]`` as frozen copies that are rebuilt from the base weight (never saved), saves the indices, and
adds ``x Rᵀ · coreᵀ · Cᵀ`` to the base output. A subclass supplies its trainable core (:meth:`create_core`,
:meth:`core`) and how the core's output joins the base output (:meth:`add_adapter_output`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import ItemsView, Iterator, KeysView, ValuesView
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_adapters_to_merge
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import CurConfig
from .cur import layer_seed, resolve_rank, select_cur_indices


class AdapterBuffers(nn.Module):
    """Adapter-keyed buffers that peft's dtype casts never reach.

    peft casts the entries of its ``BufferDict``/``ParameterDict`` containers to the base dtype when it moves an
    adapter (``_move_adapter_to_device_of_base_layer``) and up to fp32 (``autocast_adapter_dtype``); int64 indices
    survive that only thanks to a guard in recent peft, and an fp32 core would become bf16. peft ignores this
    container. With ``keep_dtype`` (indices, cores, statistics) even ``module.to(dtype)`` only moves the entries
    between devices; without it (C and R, copies of the base weight) they follow the module's dtype like any buffer.
    """

    def __init__(self, persistent: bool, keep_dtype: bool = True) -> None:
        super().__init__()
        self.persistent = persistent
        self.keep_dtype = keep_dtype

    def __setitem__(self, key: str, value: torch.Tensor) -> None:
        self.register_buffer(key, value, persistent=self.persistent)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._buffers[key]

    def __contains__(self, key: object) -> bool:
        return key in self._buffers

    def __delitem__(self, key: str) -> None:
        del self._buffers[key]
        self._non_persistent_buffers_set.discard(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._buffers)

    def keys(self) -> KeysView[str]:
        return self._buffers.keys()

    def values(self) -> ValuesView[torch.Tensor]:
        return self._buffers.values()

    def items(self) -> ItemsView[str, torch.Tensor]:
        return self._buffers.items()

    def _apply(self, fn: Any, recurse: bool = True) -> "AdapterBuffers":
        if not self.keep_dtype:
            return super()._apply(fn, recurse)
        for key, buffer in self._buffers.items():
            moved = fn(buffer)
            self._buffers[key] = moved if moved.dtype == buffer.dtype else buffer.to(moved.device)
        return self


def linear_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, fan_in_fan_out)`` of an ``nn.Linear`` or transformers ``Conv1D``."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features, False
    if isinstance(layer, Conv1D):
        in_features, out_features = layer.weight.shape  # Conv1D stores its weight as (in, out)
        return in_features, out_features, True
    raise TypeError(f"Unsupported layer type {type(layer).__name__}: only nn.Linear and transformers Conv1D.")


def _note_base_in_load(module: "CurLayer", state_dict: dict, prefix: str, *args: Any) -> None:
    module._base_in_load = f"{prefix}base_layer.weight" in state_dict


def _sync_after_load(module: "CurLayer", incompatible_keys: Any) -> None:
    module.sync_after_load(base_weight_loaded=module._base_in_load)
    module._base_in_load = False


class CurLayer(nn.Module, BaseTunerLayer):
    """One adapted linear layer: the base layer, the CUR indices, C and R, peft's merge/unmerge and the forward.

    Every adapter attribute name starts with the subclass's ``prefix`` (peft's rule, and the saved key names):
    ``<prefix>rows``/``<prefix>cols`` (saved), ``<prefix>C``/``<prefix>R`` and ``<prefix>built`` (the indices C
    and R were built from; rebuilt, never saved).
    """

    prefix: str = ""

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__()
        self.base_layer = base_layer
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        self.in_features, self.out_features, self.fan_in_fan_out = linear_shape(self.get_base_layer())
        self.add_module(f"{self.prefix}rows", AdapterBuffers(persistent=True))
        self.add_module(f"{self.prefix}cols", AdapterBuffers(persistent=True))
        self.add_module(f"{self.prefix}C", AdapterBuffers(persistent=False, keep_dtype=False))
        self.add_module(f"{self.prefix}R", AdapterBuffers(persistent=False, keep_dtype=False))
        self.add_module(f"{self.prefix}built", AdapterBuffers(persistent=False))
        self._base_in_load = False
        self.register_load_state_dict_pre_hook(_note_base_in_load)
        self.register_load_state_dict_post_hook(_sync_after_load)

    # ------------------------------------------------------------------------------------- what subclasses add

    def create_core(self, adapter_name: str, config: CurConfig, k: int, seed: int) -> None:
        """Create the adapter's trainable core (called once C and R exist)."""
        raise NotImplementedError

    def core(self, adapter_name: str) -> torch.Tensor:
        """The k × k core whose effect is not in the base weight (what peft's merge folds)."""
        raise NotImplementedError

    def add_adapter_output(self, adapter_name: str, x: torch.Tensor, base: torch.Tensor,
                           result: torch.Tensor) -> torch.Tensor:
        """``result`` plus this adapter's contribution; ``base`` is the frozen layer's output."""
        raise NotImplementedError

    def delta_bias(self, adapter_name: str) -> Optional[torch.Tensor]:
        """An output bias that peft's merge folds into the base bias (none by default)."""
        return None

    def check_mergeable(self, adapter_name: str) -> None:
        """Raise if peft's merge of this adapter would not reproduce the adapted layer."""

    def after_load(self, adapter_name: str, base_weight_loaded: bool) -> None:
        """Re-establish the adapter's invariants after ``load_state_dict`` (C and R are already rebuilt)."""

    # ------------------------------------------------------------------------------------------ C, R, indices

    @property
    def cur_rows(self) -> AdapterBuffers:
        return getattr(self, f"{self.prefix}rows")

    @property
    def cur_cols(self) -> AdapterBuffers:
        return getattr(self, f"{self.prefix}cols")

    @property
    def cur_c(self) -> AdapterBuffers:
        return getattr(self, f"{self.prefix}C")

    @property
    def cur_r(self) -> AdapterBuffers:
        return getattr(self, f"{self.prefix}R")

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as an ``out × in`` view (no copy)."""
        weight = self.get_base_layer().weight
        return weight.T if self.fan_in_fan_out else weight

    def update_layer(self, adapter_name: str, config: CurConfig, seed: int = 0) -> None:
        """Select C and R for a new adapter, create its core, move it next to the base weight."""
        k = resolve_rank(config.k, self.out_features, self.in_features, clamp=config.clamp_rank)
        rows, cols = select_cur_indices(self.weight_out_in(), k, sample=config.cur_selection == "sample", seed=seed)
        self.cur_rows[adapter_name], self.cur_cols[adapter_name] = rows, cols
        self.build_frozen(adapter_name)
        self.create_core(adapter_name, config, k, seed)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def build_frozen(self, adapter_name: str) -> None:
        """(Re)build C and R from the current base weight and the stored indices."""
        weight = self.weight_out_in()
        rows = self.cur_rows[adapter_name].to(weight.device)
        cols = self.cur_cols[adapter_name].to(weight.device)
        self.cur_c[adapter_name] = weight[:, cols].detach().contiguous()
        self.cur_r[adapter_name] = weight[rows, :].detach().contiguous()
        getattr(self, f"{self.prefix}built")[adapter_name] = torch.stack([rows, cols])

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """peft's move (its containers, with its dtype rules), then ours: the device only, never the dtype."""
        super()._move_adapter_to_device_of_base_layer(adapter_name, device=device)
        device = device or self.get_base_layer().weight.device
        if device.type == "meta":
            return
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr, None)
            if isinstance(container, AdapterBuffers) and adapter_name in container:
                container[adapter_name] = container[adapter_name].to(device)

    @torch.no_grad()
    def sync_after_load(self, base_weight_loaded: bool = False) -> None:
        """After ``load_state_dict``: C and R follow loaded indices (from an unmerged base), then the subclass."""
        built = getattr(self, f"{self.prefix}built")
        for name in list(self.cur_rows.keys()):
            loaded = torch.stack([self.cur_rows[name], self.cur_cols[name]])
            stale = built[name].is_meta or not torch.equal(built[name], loaded.to(built[name].device))
            if stale and not self.merged:
                self.check_rebuild(name, base_weight_loaded)
                self.build_frozen(name)
            self.after_load(name, base_weight_loaded)

    def check_rebuild(self, adapter_name: str, base_weight_loaded: bool) -> None:
        """Raise if C and R cannot be rebuilt from the current base weight."""

    # ------------------------------------------------------------------------------------------------- forward

    def project(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """``x Rᵀ`` (n × k) in R's dtype."""
        r = self.cur_r[adapter_name]
        return F.linear(self._cast_input_dtype(x, r.dtype), r)

    def expand(self, adapter_name: str, z: torch.Tensor) -> torch.Tensor:
        """``z Cᵀ`` (n × out) in C's dtype."""
        c = self.cur_c[adapter_name]
        return F.linear(z.to(c.dtype), c)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return base
        result = base
        for name in self.active_adapters:
            if name in self.cur_rows:
                result = self.add_adapter_output(name, x, base, result)
        return result

    # ----------------------------------------------------------------------------------- peft merge / unmerge

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``C · core · R`` in the base layer's layout and dtype (computed in fp32)."""
        c, r = self.cur_c[adapter_name], self.cur_r[adapter_name]
        delta = (c.float() @ self.core(adapter_name).float()) @ r.float()
        delta = delta.T if self.fan_in_fan_out else delta
        return delta.to(self.get_base_layer().weight.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Fold adapters into the base weight (and bias), for peft's ``merge_and_unload``."""
        base = self.get_base_layer()
        for name in check_adapters_to_merge(self, adapter_names):
            if name not in self.cur_rows:
                continue
            self.check_mergeable(name)
            bias = self.delta_bias(name)
            if bias is not None and base.bias is None and bool(bias.any()):
                raise ValueError(
                    f"Cannot merge adapter '{name}': it trained an output bias but the base layer has no bias to "
                    "fold it into."
                )
            with torch.no_grad():
                weight = base.weight.data + self.get_delta_weight(name)
                if safe_merge and not torch.isfinite(weight).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                base.weight.data = weight
                if bias is not None and base.bias is not None:
                    base.bias.data = base.bias.data + bias.to(base.bias.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters.pop()
                if name not in self.cur_rows:
                    continue
                base.weight.data -= self.get_delta_weight(name)
                bias = self.delta_bias(name)
                if bias is not None and base.bias is not None:
                    base.bias.data -= bias.to(base.bias.dtype)


class CurTuner(BaseTuner):
    """Injects a :class:`CurLayer` subclass (``tuner_layer_cls``) into ``nn.Linear`` and ``Conv1D`` modules."""

    tuner_layer_cls: type[CurLayer] = CurLayer
    target_module_mapping = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    method_label = "CUR"
    """The method's name in error messages."""

    def _create_and_replace(
        self,
        config: CurConfig,
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
            if isinstance(target, self.tuner_layer_cls):
                target.update_layer(adapter_name, config, seed=seed)
                return
            base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
            if config.fan_in_fan_out and not linear_shape(base)[2]:  # Conv1D is detected; only this is a user error
                warnings.warn(f"{type(config).__name__}.fan_in_fan_out=True but {type(base).__name__} stores "
                              "(out, in); ignored.")
            new_module = self.tuner_layer_cls(target, adapter_name, config, seed=seed)
        except (TypeError, ValueError) as err:
            raise type(err)(f"{self.method_label} cannot adapt '{current_key}': {err}") from err
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # an added adapter is not trainable until set_adapter
        self._replace_module(parent, target_name, new_module, target)

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """peft's mixed-batch ``adapter_names=`` (one adapter per sample) is not supported: say so clearly."""
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                f"{self.method_label} does not support mixed-adapter batches (adapter_names=...). Activate one "
                "adapter with set_adapter() and run each adapter's samples as their own batch."
            )
        yield
